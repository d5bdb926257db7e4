// SPDX-License-Identifier: GPL-2.0
/* Takes parameters, which the tests read back from /sys/module/kmm_ci_param/parameters. */
#include <linux/module.h>

static int level = 1;
module_param(level, int, 0444);
MODULE_PARM_DESC(level, "An integer the tests set and read back");

static char *greeting = "none";
module_param(greeting, charp, 0444);
MODULE_PARM_DESC(greeting, "A string the tests set and read back");

static int __init kmm_ci_param_init(void)
{
	pr_info("kmm_ci_param: loaded, level=%d greeting=%s\n", level, greeting);
	return 0;
}

static void __exit kmm_ci_param_exit(void)
{
	pr_info("kmm_ci_param: unloaded\n");
}

module_init(kmm_ci_param_init);
module_exit(kmm_ci_param_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmm-rs test module: parameters");
