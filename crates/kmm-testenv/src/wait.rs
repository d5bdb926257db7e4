//! Waiting for a condition on an object, with a deadline and without sleeping: the object is
//! watched and each change re-checks the condition.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::anyhow;
use kube::Resource;
use kube::api::Api;
use kube::runtime::wait::{Condition, await_condition};
use serde::de::DeserializeOwned;

/// Default deadline for one wait in tier-2 tests.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until `condition` holds for the object `name` (absent objects are passed as `None`),
/// and returns the object as last seen. Fails after `timeout` with the object's last state.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    condition: impl Condition<K>,
) -> anyhow::Result<Option<K>>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(result) => Ok(result?),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            Err(anyhow!(
                "timed out after {timeout:?} waiting for {name} to be {what}; last seen: {last:#?}"
            ))
        }
    }
}
