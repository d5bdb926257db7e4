//! Signing in the cluster: the Dockerfile that signs every `filesToSign` match with the key and
//! certificate Secrets, the kaniko pod that builds it (spec §6.2), and the checks of the signing
//! inputs (image to sign, Secrets and their keys, files under `modprobe.dirName`).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    DownwardAPIVolumeFile, DownwardAPIVolumeSource, KeyToPath, ObjectFieldSelector, Pod, Volume,
    VolumeMount,
};
use kmm_api::v1beta1::{BuildSignAction, ModuleImageSpec, Sign};
use kmm_api::wire::annotation;

use crate::build_pod::{
    BuildSignError, JobTarget, content_hash, kaniko_pod, kaniko_push_pull_args, repo_secret_volume,
    secret_volume, set_hash,
};

/// Data key of the private key in `sign.keySecret`.
pub const KEY_KEY: &str = "key";
/// Data key of the certificate in `sign.certSecret`.
pub const CERT_KEY: &str = "cert";
/// Where the signing image keeps `sign-file`.
const SIGN_FILE: &str = "/usr/local/bin/sign-file";

/// The image to sign: the built image when the entry also builds, else `sign.unsignedImage`.
pub fn unsigned_image<'a>(
    image: &'a ModuleImageSpec,
    sign: &'a Sign,
) -> Result<&'a str, BuildSignError> {
    if image.build.is_some() {
        Ok(&image.image)
    } else if !sign.unsigned_image.is_empty() {
        Ok(&sign.unsigned_image)
    } else {
        Err(BuildSignError::NoImageToSign)
    }
}

/// Every `filesToSign` entry must lie under `dir_name`, the only tree copied out of the image.
pub fn check_files_to_sign(dir_name: &str, files: &[String]) -> Result<(), BuildSignError> {
    let dir = dir_name.trim_end_matches('/');
    let outside = files.iter().find(|file| {
        let under = file
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1);
        !under || file.split('/').any(|part| part == "..")
    });
    match outside {
        Some(file) => Err(BuildSignError::FileOutsideDirName {
            file: file.clone(),
            dir_name: dir_name.to_owned(),
        }),
        None => Ok(()),
    }
}

/// The bytes under `key` of a signing Secret's data (`None`: the Secret does not exist).
pub fn signing_secret_data<'d>(
    namespace: &str,
    name: &str,
    field: &'static str,
    key: &'static str,
    data: Option<&'d BTreeMap<String, ByteString>>,
) -> Result<&'d [u8], BuildSignError> {
    let data = data.ok_or_else(|| BuildSignError::SigningSecretMissing {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        field,
    })?;
    data.get(key)
        .map(|bytes| bytes.0.as_slice())
        .ok_or_else(|| BuildSignError::SigningSecretKeyMissing {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            field,
            key,
        })
}

/// Where the generated Dockerfile finds the key and the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPaths<'a> {
    /// Private key file.
    pub key: &'a str,
    /// Certificate file.
    pub cert: &'a str,
}

/// kaniko mounts single Secret items as `key.pem` and `cert.pem`.
pub const KANIKO_KEY_PATHS: KeyPaths<'static> = KeyPaths {
    key: "/run/secrets/key/key.pem",
    cert: "/run/secrets/cert/cert.pem",
};

/// The signing Dockerfile: copy `dirName` out of the unsigned image, sign each file matching a
/// `filesToSign` glob (a glob that matches nothing fails the sign, rather than shipping an unsigned
/// module), and copy the tree back over the unsigned image.
pub fn sign_dockerfile(
    unsigned_image: &str,
    sign_image: &str,
    dir_name: &str,
    files_to_sign: &[String],
    paths: KeyPaths<'_>,
) -> String {
    let dir = dir_name.trim_end_matches('/');
    let mut text = format!(
        "FROM {unsigned_image} AS source\n\nFROM {sign_image} AS signimage\nUSER 0\nCOPY --from=source {dir} /opt{dir}\n"
    );
    for file in files_to_sign {
        text.push_str(&format!(
            "RUN for file in /opt{file}; do \\\n      if [ -e \"$file\" ]; then {SIGN_FILE} sha256 {key} {cert} \"$file\"; \\\n      else echo \"filesToSign: no file matches {file}\" >&2; exit 1; fi; \\\n    done\n",
            key = paths.key,
            cert = paths.cert,
        ));
    }
    text.push_str(&format!(
        "\nFROM source\nCOPY --from=signimage /opt{dir} {dir}\n"
    ));
    text
}

/// What a sign pod is rendered from.
#[derive(Debug, Clone, Copy)]
pub struct SignPodInput<'a> {
    /// The MBSC entry and its settings.
    pub target: JobTarget<'a>,
    /// Its sign section.
    pub sign: &'a Sign,
    /// The private key (hashed only).
    pub key: &'a [u8],
    /// The certificate (hashed only).
    pub cert: &'a [u8],
    /// kaniko image (`RELATED_IMAGE_BUILD`).
    pub build_image: &'a str,
    /// Image with `sign-file` (`RELATED_IMAGE_SIGN`).
    pub sign_image: &'a str,
}

/// Checks the sign inputs and returns the generated Dockerfile.
pub fn plan_sign(input: &SignPodInput<'_>, paths: KeyPaths<'_>) -> Result<String, BuildSignError> {
    let image = input.target.image;
    let unsigned = unsigned_image(image, input.sign)?;
    check_files_to_sign(&image.dir_name, &input.sign.files_to_sign)?;
    Ok(sign_dockerfile(
        unsigned,
        input.sign_image,
        &image.dir_name,
        &input.sign.files_to_sign,
        paths,
    ))
}

/// The kaniko sign pod (spec §6.2), with its `dockerfile` and `last-hash` annotations.
pub fn render_sign_pod(input: &SignPodInput<'_>) -> Result<Pod, BuildSignError> {
    let dockerfile = plan_sign(input, KANIKO_KEY_PATHS)?;
    let target = &input.target;
    let sign = input.sign;
    let args = kaniko_push_pull_args(target, sign.unsigned_image_registry_tls.as_ref());
    let cert_volume = format!("secret-{}", sign.cert_secret.name);
    let mut key_volume = format!("secret-{}", sign.key_secret.name);
    if key_volume == cert_volume {
        key_volume.push_str("-key");
    }
    let item = |key: &str, path: &str| {
        Some(vec![KeyToPath {
            key: key.into(),
            path: path.into(),
            mode: None,
        }])
    };
    let mut mounted = vec![
        secret_volume(
            cert_volume,
            &sign.cert_secret.name,
            item(CERT_KEY, "cert.pem"),
            "/run/secrets/cert".into(),
        ),
        secret_volume(
            key_volume,
            &sign.key_secret.name,
            item(KEY_KEY, "key.pem"),
            "/run/secrets/key".into(),
        ),
        (
            Volume {
                name: "dockerfile".into(),
                downward_api: Some(DownwardAPIVolumeSource {
                    items: Some(vec![DownwardAPIVolumeFile {
                        path: "Dockerfile".into(),
                        field_ref: Some(ObjectFieldSelector {
                            field_path: format!(
                                "metadata.annotations['{}']",
                                annotation::DOCKERFILE
                            ),
                            api_version: None,
                        }),
                        ..DownwardAPIVolumeFile::default()
                    }]),
                    ..DownwardAPIVolumeSource::default()
                }),
                ..Volume::default()
            },
            VolumeMount {
                name: "dockerfile".into(),
                mount_path: "/workspace".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ),
    ];
    mounted.extend(repo_secret_volume(target.image_repo_secret));
    let mut metadata = target.job_metadata(BuildSignAction::SignImage);
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(annotation::DOCKERFILE.to_owned(), dockerfile);
    let mut pod = kaniko_pod(
        metadata,
        input.build_image.to_owned(),
        args,
        mounted,
        None,
        target.tolerations,
    );
    let hash = content_hash(&[
        &serde_json::to_vec(&pod).unwrap_or_default(),
        input.key,
        input.cert,
    ]);
    set_hash(&mut pod.metadata, hash);
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::LocalObjectReference;
    use kmm_api::v1beta1::Build;

    fn sign(files: &[&str]) -> Sign {
        Sign {
            key_secret: LocalObjectReference {
                name: "mykey".into(),
            },
            cert_secret: LocalObjectReference {
                name: "mycert".into(),
            },
            files_to_sign: files.iter().map(|f| (*f).to_owned()).collect(),
            ..Sign::default()
        }
    }

    fn image(build: bool) -> ModuleImageSpec {
        ModuleImageSpec {
            image: "r/kmod:6.1".into(),
            kernel_version: "6.1.0-56-amd64".into(),
            dir_name: "/opt".into(),
            build: build.then(Build::default),
            ..ModuleImageSpec::default()
        }
    }

    fn input<'a>(image: &'a ModuleImageSpec, sign: &'a Sign, key: &'a [u8]) -> SignPodInput<'a> {
        SignPodInput {
            target: JobTarget {
                mbsc: "signed",
                namespace: "labs",
                owner: None,
                image,
                image_repo_secret: None,
                push: true,
                tolerations: &[],
            },
            sign,
            key,
            cert: b"cert",
            build_image: "kaniko:1",
            sign_image: "kmm/signimage:1",
        }
    }

    #[test]
    fn sign_pod_signs_the_built_image_with_mounted_keys() {
        let image = image(true);
        let sign = sign(&["/opt/lib/modules/6.1.0-56-amd64/kmm_ci_?.ko"]);
        let pod = render_sign_pod(&input(&image, &sign, b"key")).unwrap();
        assert_eq!(
            pod.metadata.name.as_deref(),
            Some("signed-sign-6-1-0-56-amd64")
        );
        let annotations = pod.metadata.annotations.clone().unwrap();
        let dockerfile = &annotations[annotation::DOCKERFILE];
        assert!(dockerfile.starts_with("FROM r/kmod:6.1 AS source\n"));
        assert!(dockerfile.contains("FROM kmm/signimage:1 AS signimage"));
        assert!(dockerfile.contains("COPY --from=source /opt /opt/opt"));
        assert!(
            dockerfile.contains("for file in /opt/opt/lib/modules/6.1.0-56-amd64/kmm_ci_?.ko; do")
        );
        assert!(dockerfile.contains(
            "/usr/local/bin/sign-file sha256 /run/secrets/key/key.pem /run/secrets/cert/cert.pem \"$file\""
        ));
        assert!(dockerfile.ends_with("FROM source\nCOPY --from=signimage /opt/opt /opt\n"));
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.containers[0].args.clone().unwrap(),
            ["--destination", "r/kmod:6.1"]
        );
        let mounts: Vec<(String, String)> = spec.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.mount_path))
            .collect();
        assert_eq!(
            mounts,
            [
                ("secret-mycert".to_owned(), "/run/secrets/cert".to_owned()),
                ("secret-mykey".to_owned(), "/run/secrets/key".to_owned()),
                ("dockerfile".to_owned(), "/workspace".to_owned()),
            ]
        );
        let other_key = render_sign_pod(&input(&image, &sign, b"other")).unwrap();
        assert_ne!(
            other_key.metadata.annotations.unwrap()[annotation::LAST_HASH],
            annotations[annotation::LAST_HASH]
        );
    }

    #[test]
    fn sign_inputs_are_checked() {
        let sign_only = image(false);
        let s = sign(&["/opt/a.ko"]);
        assert_eq!(
            render_sign_pod(&input(&sign_only, &s, b"k")).unwrap_err(),
            BuildSignError::NoImageToSign
        );
        let built = image(true);
        for bad in [
            "/lib/modules/a.ko",
            "/opt",
            "/opt/../etc/a.ko",
            "/optx/a.ko",
        ] {
            let s = sign(&[bad]);
            let err = render_sign_pod(&input(&built, &s, b"k")).unwrap_err();
            assert!(
                matches!(err, BuildSignError::FileOutsideDirName { .. }),
                "{bad}: {err}"
            );
        }
        let data = BTreeMap::from([("tls.key".to_owned(), ByteString(b"x".to_vec()))]);
        let err =
            signing_secret_data("labs", "mykey", "keySecret", KEY_KEY, Some(&data)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid Secret labs/mykey (sign.keySecret): key \"key\" is missing"
        );
        let err = signing_secret_data("labs", "mycert", "certSecret", CERT_KEY, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Secret labs/mycert (sign.certSecret) not found"
        );
    }

    #[test]
    fn one_secret_for_key_and_cert_gets_two_volumes() {
        let image = image(true);
        let mut s = sign(&["/opt/a.ko"]);
        s.cert_secret.name = "mykey".into();
        let pod = render_sign_pod(&input(&image, &s, b"k")).unwrap();
        let names: Vec<String> = pod
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["secret-mykey", "secret-mykey-key", "dockerfile"]);
    }
}
