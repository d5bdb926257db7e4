//! The caches every reconciler reads, one watch per kind: each kind's events go to one
//! reflector store and are fanned out to every controller that needs them as a trigger.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, PoisonError, RwLock};

use futures::{Stream, StreamExt, TryStreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// Events a controller receives for one kind.
pub type Trigger<K> = std::pin::Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send>>;

/// A watched kind: its cache, one trigger stream per consumer, and the future that drives the
/// watch (it must be polled for anything to arrive).
pub struct Watched<K: Resource + 'static>
where
    K::DynamicType: Hash + Eq,
{
    /// The cache.
    pub store: Store<K>,
    /// One trigger per consumer, in the order asked for.
    pub triggers: Vec<Trigger<K>>,
    /// Drives the watch; runs until dropped.
    pub driver: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// Watches `api` with `config` and fans every created, changed or deleted object out to
/// `consumers` trigger streams.
pub fn watch<K>(api: Api<K>, config: watcher::Config, consumers: usize) -> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Hash + Eq + Clone + Send + Sync,
{
    watch_indexed(api, config, consumers, None, |_| {})
}

/// [`watch`], with `trim` applied to every object before it is cached (to drop fields no
/// reconciler reads), and `index` kept up to date with the cache: the index sees each event
/// just before the cache does, so an object a trigger announces is in both.
pub fn watch_indexed<K>(
    api: Api<K>,
    config: watcher::Config,
    consumers: usize,
    index: Option<Index<K>>,
    trim: fn(&mut K),
) -> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Hash + Eq + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    // Unbounded: a consumer that is busy must never hold up the watch (and with it the cache
    // every reconciler reads); the controllers drain their triggers into deduplicating queues.
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..consumers)
        .map(|_| mpsc::unbounded_channel::<Result<K, watcher::Error>>())
        .unzip();
    // managedFields are never read here and are a large part of every object (pods and nodes
    // collect one entry per writer): drop them before they reach the cache.
    let stream = watcher(api, config)
        .default_backoff()
        .modify(move |object| {
            object.meta_mut().managed_fields = None;
            trim(object);
        })
        .inspect_ok(move |event| {
            if let Some(index) = &index {
                index.apply(event);
            }
        });
    let events = reflector::reflector(writer, stream).touched_objects();
    let driver = Box::pin(async move {
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(object) => {
                    for sender in &senders {
                        // A consumer that is gone (shutting down) is not an error.
                        let _ = sender.send(Ok(object.clone()));
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, kind = %K::kind(&K::DynamicType::default()), "watch error; retrying")
                }
            }
        }
    });
    let triggers = receivers
        .into_iter()
        .map(|rx| -> Trigger<K> {
            Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            }))
        })
        .collect();
    Watched {
        store,
        triggers,
        driver,
    }
}

/// Objects of a cache grouped by a key computed from each object (worker pods by node), so a
/// reconciler reads its few objects without scanning the whole cache.
pub struct Index<K: Resource>
where
    K::DynamicType: Hash + Eq,
{
    key: fn(&K) -> Option<String>,
    state: Arc<RwLock<IndexState<K>>>,
}

impl<K: Resource> Clone for Index<K>
where
    K::DynamicType: Hash + Eq,
{
    fn clone(&self) -> Self {
        Self {
            key: self.key,
            state: self.state.clone(),
        }
    }
}

struct IndexState<K: Resource>
where
    K::DynamicType: Hash + Eq,
{
    by_key: HashMap<String, HashSet<ObjectRef<K>>>,
    key_of: HashMap<ObjectRef<K>, String>,
    /// A relist in progress: the index it will replace the current one with.
    relist: Option<Box<IndexState<K>>>,
}

impl<K: Resource> Default for IndexState<K>
where
    K::DynamicType: Hash + Eq,
{
    fn default() -> Self {
        Self {
            by_key: HashMap::new(),
            key_of: HashMap::new(),
            relist: None,
        }
    }
}

impl<K: Resource> IndexState<K>
where
    K::DynamicType: Default + Hash + Eq + Clone,
{
    fn remove(&mut self, object: &ObjectRef<K>) {
        if let Some(old) = self.key_of.remove(object)
            && let Some(set) = self.by_key.get_mut(&old)
        {
            set.remove(object);
            if set.is_empty() {
                self.by_key.remove(&old);
            }
        }
    }

    fn insert(&mut self, object: ObjectRef<K>, key: Option<String>) {
        self.remove(&object);
        if let Some(key) = key {
            self.by_key
                .entry(key.clone())
                .or_default()
                .insert(object.clone());
            self.key_of.insert(object, key);
        }
    }
}

impl<K: Resource> Index<K>
where
    K::DynamicType: Default + Hash + Eq + Clone,
{
    /// An empty index keyed by `key` (objects it gives `None` are left out).
    pub fn new(key: fn(&K) -> Option<String>) -> Self {
        Self {
            key,
            state: Arc::default(),
        }
    }

    /// The objects under `key`, in a stable order.
    pub fn get(&self, key: &str) -> Vec<ObjectRef<K>> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let mut objects: Vec<ObjectRef<K>> = state
            .by_key
            .get(key)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        objects.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        objects
    }

    fn apply(&self, event: &watcher::Event<K>) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(object) => {
                state.insert(ObjectRef::from_obj(object), (self.key)(object));
            }
            watcher::Event::Delete(object) => state.remove(&ObjectRef::from_obj(object)),
            watcher::Event::Init => state.relist = Some(Box::default()),
            watcher::Event::InitApply(object) => {
                let relist = state.relist.get_or_insert_with(Box::default);
                relist.insert(ObjectRef::from_obj(object), (self.key)(object));
            }
            watcher::Event::InitDone => {
                if let Some(relist) = state.relist.take() {
                    *state = *relist;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Pod, PodSpec};

    fn pod(name: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn names(index: &Index<Pod>, node: &str) -> Vec<String> {
        index.get(node).into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn index_follows_applies_deletes_and_relists() {
        let index = Index::new(|p: &Pod| p.spec.as_ref()?.node_name.clone());
        index.apply(&watcher::Event::Apply(pod("a", Some("n1"))));
        index.apply(&watcher::Event::Apply(pod("b", Some("n1"))));
        index.apply(&watcher::Event::Apply(pod("c", None)));
        assert_eq!(names(&index, "n1"), ["a", "b"]);
        // A key that appears later (a pod being scheduled) moves the object.
        index.apply(&watcher::Event::Apply(pod("a", Some("n2"))));
        assert_eq!(names(&index, "n1"), ["b"]);
        assert_eq!(names(&index, "n2"), ["a"]);
        index.apply(&watcher::Event::Delete(pod("b", Some("n1"))));
        assert!(names(&index, "n1").is_empty());

        // A relist replaces everything at its end, and not before.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(pod("d", Some("n1"))));
        assert_eq!(names(&index, "n2"), ["a"]);
        assert!(names(&index, "n1").is_empty());
        index.apply(&watcher::Event::InitDone);
        assert!(names(&index, "n2").is_empty());
        assert_eq!(names(&index, "n1"), ["d"]);
    }
}
