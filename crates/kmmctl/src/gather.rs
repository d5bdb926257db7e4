//! Reads what `explain` and `status` need from the cluster, with a few list calls (not one per
//! node): Modules, Nodes, NodeModulesConfigs, the Modules' image and build/sign records and the
//! pods labelled with a Module name.

use std::collections::BTreeMap;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Node, Pod};
use kmm_api::v1beta1::{Module, ModuleBuildSignConfig, ModuleImagesConfig, NodeModulesConfig};
use kmm_api::wire::label;
use kube::api::{Api, ListParams};
use kube::{Client, Resource, ResourceExt};

use crate::explain::Observed;

/// Which Modules to read.
#[derive(Debug, Clone)]
pub enum Selection {
    /// One Module.
    One {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// Every Module of a namespace.
    Namespace(String),
    /// Every Module.
    All,
}

/// A list that tolerates a kind the cluster does not serve (an older CRD set): empty.
async fn list_or_empty<K>(api: Api<K>, params: &ListParams) -> anyhow::Result<Vec<K>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list(params).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Vec::new()),
        Err(err) => Err(err.into()),
    }
}

fn api_in<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Reads the selected Modules and everything about them. A missing named Module is an error.
pub async fn observe(client: &Client, selection: &Selection) -> anyhow::Result<Vec<Observed>> {
    let (namespace, modules): (Option<&str>, Vec<Module>) = match selection {
        Selection::One { namespace, name } => {
            let api = Api::<Module>::namespaced(client.clone(), namespace);
            let module = api
                .get_opt(name)
                .await
                .with_context(|| format!("reading Module {namespace}/{name}"))?
                .with_context(|| format!("there is no Module {name} in namespace {namespace}"))?;
            (Some(namespace.as_str()), vec![module])
        }
        Selection::Namespace(namespace) => {
            let api = Api::<Module>::namespaced(client.clone(), namespace);
            let list = api
                .list(&ListParams::default())
                .await
                .with_context(|| format!("listing Modules in {namespace}"))?;
            (Some(namespace.as_str()), list.items)
        }
        Selection::All => {
            let list = Api::<Module>::all(client.clone())
                .list(&ListParams::default())
                .await
                .context("listing Modules")?;
            (None, list.items)
        }
    };
    if modules.is_empty() {
        return Ok(Vec::new());
    }
    let all = ListParams::default();
    let nodes = Api::<Node>::all(client.clone())
        .list(&all)
        .await
        .context("listing Nodes")?
        .items;
    let nmcs = list_or_empty(Api::<NodeModulesConfig>::all(client.clone()), &all)
        .await
        .context("listing NodeModulesConfigs")?;
    let mics = list_or_empty(api_in::<ModuleImagesConfig>(client, namespace), &all)
        .await
        .context("listing ModuleImagesConfigs")?;
    let mbscs = list_or_empty(api_in::<ModuleBuildSignConfig>(client, namespace), &all)
        .await
        .context("listing ModuleBuildSignConfigs")?;
    let pods = api_in::<Pod>(client, namespace)
        .list(&ListParams::default().labels(label::MODULE_NAME))
        .await
        .context("listing the Modules' pods")?
        .items;

    let key = |ns: Option<String>, name: String| (ns.unwrap_or_default(), name);
    let mut mics: BTreeMap<_, _> = mics
        .into_iter()
        .map(|m| (key(m.namespace(), m.name_any()), m))
        .collect();
    let mut mbscs: BTreeMap<_, _> = mbscs
        .into_iter()
        .map(|m| (key(m.namespace(), m.name_any()), m))
        .collect();
    let mut observed: Vec<Observed> = modules
        .into_iter()
        .map(|module| {
            let id = key(module.namespace(), module.name_any());
            let module_pods = pods
                .iter()
                .filter(|p| {
                    p.namespace().as_deref() == Some(id.0.as_str())
                        && p.labels().get(label::MODULE_NAME) == Some(&id.1)
                })
                .cloned()
                .collect();
            Observed {
                mic: mics.remove(&id),
                mbsc: mbscs.remove(&id),
                pods: module_pods,
                nodes: nodes.clone(),
                nmcs: nmcs.clone(),
                module,
            }
        })
        .collect();
    observed.sort_by_key(|o| (o.module.namespace(), o.module.name_any()));
    Ok(observed)
}
