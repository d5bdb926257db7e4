//! In-cluster builds on OpenShift (spec §6.6): `build.openshift.io/v1` Build objects instead of
//! kaniko pods, with the same names, labels, finalizers and owner. The Dockerfile is inlined, the
//! build runs as the `builder` ServiceAccount and, without an `imageRepoSecret`, pushes with that
//! account's own credentials (the internal registry).

use serde_json::{Value, json};

use kmm_api::v1beta1::{Build, BuildSignAction};

use crate::build_pod::{JobTarget, build_args, content_hash, set_hash};
use crate::sign_pod::{KeyPaths, SignPodInput, plan_sign};

/// API version of OpenShift Builds.
pub const API_VERSION: &str = "build.openshift.io/v1";
/// Kind of OpenShift Builds.
pub const KIND: &str = "Build";
/// ServiceAccount that runs OpenShift Builds.
pub const BUILDER_SERVICE_ACCOUNT: &str = "builder";

/// OpenShift mounts whole Secrets, so the files keep their data key names.
pub const OPENSHIFT_KEY_PATHS: KeyPaths<'static> = KeyPaths {
    key: "/run/secrets/key/key",
    cert: "/run/secrets/cert/cert",
};

fn secret_build_volume(volume: &str, secret: &str, path: &str) -> Value {
    json!({
        "name": volume,
        "source": {"type": "Secret", "secret": {"secretName": secret}},
        "mounts": [{"destinationPath": path}],
    })
}

fn build_object(
    target: &JobTarget<'_>,
    action: BuildSignAction,
    dockerfile: &str,
    strategy: Value,
    node_selector: Value,
    extra_hash: &[&[u8]],
) -> Value {
    let mut output = json!({});
    if target.push {
        output["to"] = json!({"kind": "DockerImage", "name": target.image.image});
        if let Some(secret) = target.image_repo_secret {
            output["pushSecret"] = json!({"name": secret.name});
        }
    }
    let spec = json!({
        "serviceAccount": BUILDER_SERVICE_ACCOUNT,
        "source": {"type": "Dockerfile", "dockerfile": dockerfile},
        "strategy": {"type": "Docker", "dockerStrategy": strategy},
        "output": output,
        "mountTrustedCA": true,
        "nodeSelector": node_selector,
    });
    let mut metadata = target.job_metadata(action);
    let mut parts: Vec<&[u8]> = Vec::new();
    let spec_bytes = serde_json::to_vec(&spec).unwrap_or_default();
    parts.push(&spec_bytes);
    parts.extend_from_slice(extra_hash);
    set_hash(&mut metadata, content_hash(&parts));
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": spec,
    })
}

/// The Build of a module image: Docker strategy with the build arguments (the injected ones and
/// `DTK_AUTO` included), pull secret and build Secrets.
pub fn render_build(
    target: &JobTarget<'_>,
    build: &Build,
    dockerfile: &str,
    dtk_image: Option<&str>,
) -> Value {
    let args: Vec<Value> = build_args(target, build, dtk_image)
        .into_iter()
        .map(|a| json!({"name": a.name, "value": a.value}))
        .collect();
    let mut strategy = json!({"buildArgs": args});
    if let Some(secret) = target.image_repo_secret {
        strategy["pullSecret"] = json!({"name": secret.name});
    }
    if !build.secrets.is_empty() {
        strategy["volumes"] = build
            .secrets
            .iter()
            .map(|s| {
                secret_build_volume(
                    &format!("secret-{}", s.name),
                    &s.name,
                    &format!("/run/secrets/{}", s.name),
                )
            })
            .collect();
    }
    // Registry trust on OpenShift comes from the cluster image configuration, not the Build.
    let selector = json!(build.selector);
    build_object(
        target,
        BuildSignAction::BuildImage,
        dockerfile,
        strategy,
        selector,
        &[],
    )
}

/// The Build that signs a module image with the generated Dockerfile.
pub fn render_sign(input: &SignPodInput<'_>) -> Result<Value, crate::build_pod::BuildSignError> {
    let dockerfile = plan_sign(input, OPENSHIFT_KEY_PATHS)?;
    let target = &input.target;
    let sign = input.sign;
    let mut key_volume = format!("secret-{}", sign.key_secret.name);
    let cert_volume = format!("secret-{}", sign.cert_secret.name);
    if key_volume == cert_volume {
        key_volume.push_str("-key");
    }
    let mut strategy = json!({
        "volumes": [
            secret_build_volume(&key_volume, &sign.key_secret.name, "/run/secrets/key"),
            secret_build_volume(&cert_volume, &sign.cert_secret.name, "/run/secrets/cert"),
        ],
    });
    if let Some(secret) = target.image_repo_secret {
        strategy["pullSecret"] = json!({"name": secret.name});
    }
    Ok(build_object(
        target,
        BuildSignAction::SignImage,
        &dockerfile,
        strategy,
        json!({}),
        &[input.key, input.cert],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::LocalObjectReference;
    use kmm_api::v1beta1::{BuildArg, ModuleImageSpec, Sign};
    use kmm_api::wire::{annotation, label};

    fn image() -> ModuleImageSpec {
        ModuleImageSpec {
            image: "image-registry.openshift-image-registry.svc:5000/default/kmm-kmod:4.18.0f"
                .into(),
            kernel_version: "4.18.0-372.19.1.el8_6.x86_64".into(),
            dir_name: "/opt".into(),
            build: Some(Build::default()),
            ..ModuleImageSpec::default()
        }
    }

    fn target(image: &ModuleImageSpec) -> JobTarget<'_> {
        JobTarget {
            mbsc: "kmm-ci-a",
            namespace: "default",
            owner: None,
            image,
            image_repo_secret: None,
            push: true,
            tolerations: &[],
        }
    }

    #[test]
    fn lab1_build_object() {
        let image = image();
        let build = Build {
            dockerfile_config_map: LocalObjectReference {
                name: "build-module-multi".into(),
            },
            build_args: vec![BuildArg {
                name: "X".into(),
                value: "1".into(),
            }],
            ..Build::default()
        };
        let dockerfile = "ARG DTK_AUTO\nFROM ${DTK_AUTO} AS builder\n";
        let b = render_build(
            &target(&image),
            &build,
            dockerfile,
            Some("quay.io/dtk@sha256:1"),
        );
        assert_eq!(b["kind"], "Build");
        assert_eq!(
            b["metadata"]["name"],
            "kmm-ci-a-build-4-18-0-372-19-1-el8-6-x86-64"
        );
        assert_eq!(b["metadata"]["labels"][label::RESOURCE_TYPE], "BuildImage");
        assert!(b["metadata"]["annotations"][annotation::LAST_HASH].is_string());
        let spec = &b["spec"];
        assert_eq!(spec["serviceAccount"], "builder");
        assert_eq!(spec["source"]["type"], "Dockerfile");
        assert_eq!(spec["source"]["dockerfile"], dockerfile);
        assert_eq!(spec["strategy"]["type"], "Docker");
        let args: Vec<String> = spec["strategy"]["dockerStrategy"]["buildArgs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                format!(
                    "{}={}",
                    a["name"].as_str().unwrap(),
                    a["value"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            args,
            [
                "X=1",
                "KERNEL_FULL_VERSION=4.18.0-372.19.1.el8_6.x86_64",
                "KERNEL_VERSION=4.18.0-372.19.1.el8_6.x86_64",
                "MOD_NAME=kmm-ci-a",
                "MOD_NAMESPACE=default",
                "DTK_AUTO=quay.io/dtk@sha256:1",
            ]
        );
        assert_eq!(spec["output"]["to"]["kind"], "DockerImage");
        assert_eq!(spec["output"]["to"]["name"], image.image);
        // No imageRepoSecret: the builder account's own credentials push.
        assert!(spec["output"].get("pushSecret").is_none());
        assert_eq!(spec["mountTrustedCA"], true);
    }

    #[test]
    fn sign_object_mounts_whole_secrets() {
        let image = image();
        let sign = Sign {
            key_secret: LocalObjectReference { name: "k".into() },
            cert_secret: LocalObjectReference { name: "c".into() },
            files_to_sign: vec!["/opt/lib/modules/x/kmm_ci_a.ko".into()],
            ..Sign::default()
        };
        let secret = LocalObjectReference {
            name: "push".into(),
        };
        let mut t = target(&image);
        t.image_repo_secret = Some(&secret);
        let b = render_sign(&SignPodInput {
            target: t,
            sign: &sign,
            key: b"k",
            cert: b"c",
            build_image: "",
            sign_image: "signimage:1",
        })
        .unwrap();
        assert_eq!(
            b["metadata"]["name"],
            "kmm-ci-a-sign-4-18-0-372-19-1-el8-6-x86-64"
        );
        let dockerfile = b["spec"]["source"]["dockerfile"].as_str().unwrap();
        assert!(
            dockerfile.contains("sign-file sha256 /run/secrets/key/key /run/secrets/cert/cert")
        );
        assert_eq!(b["spec"]["output"]["pushSecret"]["name"], "push");
        assert_eq!(
            b["spec"]["strategy"]["dockerStrategy"]["volumes"][0]["mounts"][0]["destinationPath"],
            "/run/secrets/key"
        );
    }
}
