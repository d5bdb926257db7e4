// SPDX-License-Identifier: GPL-2.0
/* Calls a symbol of kmm_ci_provider: loads only after it (or fails with "Unknown symbol"). */
#include <linux/module.h>

int kmm_ci_provider_value(void);

static int __init kmm_ci_consumer_init(void)
{
	pr_info("kmm_ci_consumer: loaded, provider says %d\n", kmm_ci_provider_value());
	return 0;
}

static void __exit kmm_ci_consumer_exit(void)
{
	pr_info("kmm_ci_consumer: unloaded\n");
}

module_init(kmm_ci_consumer_init);
module_exit(kmm_ci_consumer_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmm-rs test module: uses kmm_ci_provider_value");
