//! Objects as Go clients serialise them (every field without `omitempty` present, nil as `null`)
//! deserialise into the Rust types.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use kmm_api::v1beta1::{ImageState, Module, ModuleImagesConfigStatus, NodeModulesConfig};
use serde_json::json;

#[test]
fn go_serialised_module_with_nulls_deserialises() {
    let module: Module = serde_json::from_value(json!({
        "apiVersion": "kmm.sigs.x-k8s.io/v1beta1", "kind": "Module",
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {
            "devicePlugin": null,
            "selector": null,
            "moduleLoader": {
                "container": {
                    "kernelMappings": [{
                        "build": null, "containerImage": "", "literal": "", "registryTLS": null,
                        "regexp": "^.+$", "inTreeModuleToRemove": "", "inTreeModulesToRemove": null
                    }],
                    "modprobe": {"moduleName": "m", "dirName": null},
                    "registryTLS": {},
                    "inTreeModuleToRemove": "",
                    "inTreeModulesToRemove": null,
                    "containerImage": "r/m:${KERNEL_FULL_VERSION}",
                    "build": {"buildArgs": null, "dockerfileConfigMap": {"name": "cm"}, "secrets": null}
                }
            }
        },
        "status": {"devicePlugin": {}, "dra": {}, "moduleLoader": {}}
    }))
    .unwrap();
    assert!(module.spec.selector.is_empty());
    let container = &module.spec.module_loader.as_ref().unwrap().container;
    assert_eq!(container.kernel_mappings[0].in_tree_modules_to_remove, None);
    assert_eq!(
        container.modprobe.dir_name, "/opt",
        "null dirName takes the default"
    );
    assert!(container.build.as_ref().unwrap().build_args.is_empty());
}

#[test]
fn empty_mapping_list_differs_from_nil() {
    let module: Module = serde_json::from_value(json!({
        "metadata": {"name": "m"},
        "spec": {"selector": {}, "moduleLoader": {"container": {
            "modprobe": {"moduleName": "m"},
            "kernelMappings": [{"regexp": ".", "containerImage": "a:b", "inTreeModulesToRemove": []}]
        }}}
    }))
    .unwrap();
    let mapping = &module.spec.module_loader.unwrap().container.kernel_mappings[0];
    assert_eq!(
        mapping.in_tree_modules_to_remove,
        Some(vec![]),
        "[] overrides the container list"
    );
}

#[test]
fn go_serialised_nmc_and_mic_status_deserialise() {
    let nmc: NodeModulesConfig = serde_json::from_value(json!({
        "metadata": {"name": "node-1"},
        "spec": {"modules": [{
            "name": "m", "namespace": "ns", "serviceAccountName": "default", "tolerations": null,
            "config": {"kernelVersion": "6.1.0", "containerImage": "a:b", "imagePullPolicy": "",
                       "insecurePull": false, "modprobe": {"moduleName": "m", "dirName": "/opt"}}
        }]},
        "status": {"modules": null}
    }))
    .unwrap();
    assert_eq!(nmc.spec.modules[0].item.service_account_name, "default");
    assert!(nmc.status.unwrap().modules.is_empty());

    let status: ModuleImagesConfigStatus = serde_json::from_value(json!({
        "imagesStates": [{"image": "a:b", "status": ""}, {"image": "c:d", "status": "NeedsSigning"}]
    }))
    .unwrap();
    assert_eq!(status.images_states[0].status, ImageState::Unknown);
    assert_eq!(status.images_states[1].status, ImageState::NeedsSigning);
}

#[test]
fn worker_config_rejects_unknown_keys() {
    let err = serde_json::from_value::<kmm_api::v1beta1::ModuleConfig>(json!({
        "kernelVersion": "6.1.0", "containerImage": "a:b", "insecurePull": false,
        "modprobe": {"moduleName": "m"}, "surprise": 1
    }))
    .unwrap_err();
    assert!(err.to_string().contains("surprise"), "{err}");
}
