// SPDX-License-Identifier: GPL-2.0
/* Exports one symbol so that kmm_ci_consumer has a hard dependency to resolve. */
#include <linux/module.h>

int kmm_ci_provider_value(void)
{
	return 42;
}
EXPORT_SYMBOL_GPL(kmm_ci_provider_value);

static int __init kmm_ci_provider_init(void)
{
	pr_info("kmm_ci_provider: loaded\n");
	return 0;
}

static void __exit kmm_ci_provider_exit(void)
{
	pr_info("kmm_ci_provider: unloaded\n");
}

module_init(kmm_ci_provider_init);
module_exit(kmm_ci_provider_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmm-rs test module: exports kmm_ci_provider_value");
MODULE_VERSION("1.0.0");
