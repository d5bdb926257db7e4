//! Lease-based leader election (`coordination.k8s.io/v1` Lease in the operator namespace), with
//! client-go's semantics: a candidate takes a Lease over only after it has seen the Lease
//! unchanged for `leaseDuration` by its *own* clock (no trust in other nodes' clocks); the leader
//! renews every `retryPeriod` and gives up when it could not renew for `renewDeadline`; on a
//! graceful shutdown the leader releases the Lease so a successor takes over at once.
//!
//! Every write is an update with the `resourceVersion` last read, so two candidates can never
//! both win. Each process writes the Lease with its own field manager
//! (`kmm-operator/<identity>`), which makes "who wrote the Lease" visible in `managedFields`.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;

/// Timings of the election.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

/// One candidate.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    field_manager: String,
    timings: Timings,
    observed: Option<Observed>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The last Lease record seen, and when (by our clock) it last changed.
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

/// Outcome of one election round.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Leading,
    Following(Option<String>),
}

/// A process identity: `<hostname>_<random>`, like controller-runtime's.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "kmm-operator".into());
    let nanos = jiff::Timestamp::now().as_nanosecond();
    format!("{host}_{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
}

impl LeaderElector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: String,
        timings: Timings,
    ) -> Self {
        let mut field_manager = format!("kmm-operator/{identity}");
        field_manager.truncate(128);
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            field_manager,
            timings,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits to become leader, then runs `lead()` for as long as leadership lasts.
    ///
    /// Returns `Ok(())` when `shutdown` resolves (after releasing the Lease if leading) or when
    /// `lead()` ends successfully. Returns an error when leadership is lost: `lead()` has then
    /// been dropped, and the caller should exit so that no task of the old term survives.
    pub async fn run<F, Fut>(
        mut self,
        leader: watch::Sender<bool>,
        shutdown: impl Future<Output = ()>,
        lead: F,
    ) -> anyhow::Result<()>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let mut shutdown = std::pin::pin!(shutdown);
        let retry = self.timings.retry_period;

        // Candidate.
        let mut last_holder = None;
        loop {
            match self.round().await {
                Ok(Round::Leading) => break,
                Ok(Round::Following(holder)) => {
                    if holder != last_holder {
                        tracing::info!(
                            lease = %self.name,
                            holder = holder.as_deref().unwrap_or(""),
                            "waiting for leadership"
                        );
                        last_holder = holder;
                    }
                }
                Err(err) => tracing::warn!(lease = %self.name, "leader election: {err:#}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = &mut shutdown => return Ok(()),
            }
        }

        // Leader.
        tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
        let _ = leader.send(true);
        let mut last_renew = Instant::now();
        // Boxed, so that dropping it really ends the controllers (a stack pin would keep them
        // alive until this function returns).
        let mut work = Box::pin(lead());
        let outcome = loop {
            tokio::select! {
                result = &mut work => {
                    break result.context("the controllers stopped");
                }
                _ = tokio::time::sleep(retry) => {
                    match self.round().await {
                        Ok(Round::Leading) => last_renew = Instant::now(),
                        Ok(Round::Following(holder)) => {
                            break Err(anyhow::anyhow!(
                                "leadership lost: Lease {} is now held by {}",
                                self.name, holder.unwrap_or_default()
                            ));
                        }
                        Err(err) => {
                            tracing::warn!(lease = %self.name, "renewing the Lease: {err:#}");
                            if last_renew.elapsed() > self.timings.renew_deadline {
                                break Err(anyhow::anyhow!(
                                    "leadership lost: could not renew Lease {} for {:?}",
                                    self.name, self.timings.renew_deadline
                                ));
                            }
                        }
                    }
                }
                _ = &mut shutdown => break Ok(()),
            }
        };
        // Drop the leader's work before anything else, so it cannot write after this point.
        drop(work);
        let _ = leader.send(false);
        match &outcome {
            Ok(()) => {
                if let Err(err) = self.release().await {
                    tracing::warn!(lease = %self.name, "releasing the Lease: {err:#}");
                } else {
                    tracing::info!(lease = %self.name, "released leadership");
                }
            }
            Err(err) => tracing::error!(lease = %self.name, "{err:#}"),
        }
        outcome
    }

    /// One try to acquire or renew.
    async fn round(&mut self) -> anyhow::Result<Round> {
        let now = MicroTime(jiff::Timestamp::now());
        let duration_seconds =
            i32::try_from(self.timings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&self.post_params(), &lease).await {
                Ok(_) => Ok(Round::Leading),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Round::Following(None)),
                Err(err) => Err(err.into()),
            };
        };

        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let changed = match &self.observed {
            Some(seen) => seen.holder != holder || seen.renew_time != spec.renew_time,
            None => true,
        };
        if changed {
            self.observed = Some(Observed {
                holder: holder.clone(),
                renew_time: spec.renew_time.clone(),
                at: Instant::now(),
            });
        }
        let held_by_us = holder.as_deref() == Some(self.identity.as_str());
        if !held_by_us && let Some(other) = &holder {
            let valid_for = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(duration_seconds)).unwrap_or(0),
            );
            let unchanged_for = self
                .observed
                .as_ref()
                .map_or(Duration::ZERO, |o| o.at.elapsed());
            if unchanged_for < valid_for {
                return Ok(Round::Following(Some(other.clone())));
            }
        }
        if !held_by_us {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(duration_seconds);
        match self
            .api
            .replace(&self.name, &self.post_params(), &lease)
            .await
        {
            Ok(_) => Ok(Round::Leading),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Round::Following(holder)),
            Err(err) => Err(err.into()),
        }
    }

    /// Gives the Lease up (empty holder), so that a candidate takes over without waiting.
    async fn release(&self) -> anyhow::Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            bail!("the Lease is no longer ours");
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        self.api
            .replace(&self.name, &self.post_params(), &lease)
            .await?;
        Ok(())
    }

    fn post_params(&self) -> PostParams {
        PostParams {
            field_manager: Some(self.field_manager.clone()),
            ..Default::default()
        }
    }
}
