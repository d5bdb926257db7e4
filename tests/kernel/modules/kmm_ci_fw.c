// SPDX-License-Identifier: GPL-2.0
/*
 * Requests kmm_ci_fw.bin while loading and refuses to load without it; the size it got is
 * readable from /sys/module/kmm_ci_fw/parameters/fw_size.
 */
#include <linux/firmware.h>
#include <linux/module.h>
#include <linux/platform_device.h>

#define KMM_CI_FW_NAME "kmm_ci_fw.bin"

static int fw_size = -1;
module_param(fw_size, int, 0444);
MODULE_PARM_DESC(fw_size, "Size in bytes of the firmware file found at load time (read-only)");

static struct platform_device *kmm_ci_fw_dev;

static int __init kmm_ci_fw_init(void)
{
	const struct firmware *fw;
	int err;

	kmm_ci_fw_dev = platform_device_register_simple("kmm_ci_fw", -1, NULL, 0);
	if (IS_ERR(kmm_ci_fw_dev))
		return PTR_ERR(kmm_ci_fw_dev);

	err = request_firmware(&fw, KMM_CI_FW_NAME, &kmm_ci_fw_dev->dev);
	if (err) {
		platform_device_unregister(kmm_ci_fw_dev);
		return err;
	}
	fw_size = fw->size;
	release_firmware(fw);
	pr_info("kmm_ci_fw: loaded, firmware %s has %d bytes\n", KMM_CI_FW_NAME, fw_size);
	return 0;
}

static void __exit kmm_ci_fw_exit(void)
{
	platform_device_unregister(kmm_ci_fw_dev);
	pr_info("kmm_ci_fw: unloaded\n");
}

module_init(kmm_ci_fw_init);
module_exit(kmm_ci_fw_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("kmm-rs test module: needs firmware");
MODULE_FIRMWARE(KMM_CI_FW_NAME);
