//! The caches every reconciler reads, one watch per kind: each kind's events go to one
//! reflector store and are fanned out to every controller that needs them as a trigger.

use std::fmt::Debug;
use std::hash::Hash;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
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
        .modify(|object| object.meta_mut().managed_fields = None);
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
