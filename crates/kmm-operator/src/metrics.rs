//! Prometheus metrics. The KMM gauges (Go KMM's names) are computed at scrape time from a Module
//! and a PreflightValidation cache, so they are exact on every replica and never stale;
//! `kmm_leader` says whether this process holds the Lease.

use std::sync::Arc;

use futures::StreamExt;
use kmm_api::v1beta1::Module;
use kmm_api::v1beta2::PreflightValidation;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The registry and the metrics the runtime sets itself.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub leader: Gauge,
    /// Passes of every reconciler, for `controllers::run_with`.
    pub reconcile: ReconcileMetrics,
}

type ControllerLabel = [(&'static str, &'static str); 1];
type ResultLabels = [(&'static str, &'static str); 2];

fn reconcile_time_histogram() -> Histogram {
    // 1 ms … ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Reconcile passes per controller, under controller-runtime's names so that dashboards made for
/// Go operators (Go KMM included) work unchanged: `controller_runtime_reconcile_total`
/// (`controller`, `result` = `success`, `error`, `requeue_after`),
/// `controller_runtime_reconcile_errors_total` and `controller_runtime_reconcile_time_seconds`.
/// Cheap to clone; clones share the counts.
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    total: Family<ResultLabels, Counter>,
    errors: Family<ControllerLabel, Counter>,
    time: Family<ControllerLabel, Histogram, fn() -> Histogram>,
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        Self {
            total: Family::default(),
            errors: Family::default(),
            time: Family::new_with_constructor(reconcile_time_histogram),
        }
    }
}

/// How a reconcile pass ended, as controller-runtime labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassResult {
    /// Done; waits for the next change.
    Success,
    /// Done for now; asked to run again after a delay.
    RequeueAfter,
    /// Failed; retried with backoff.
    Error,
}

impl PassResult {
    fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::RequeueAfter => "requeue_after",
            Self::Error => "error",
        }
    }
}

impl ReconcileMetrics {
    /// Registers the three families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "controller_runtime_reconcile",
            "Reconcile passes per controller and result",
            self.total.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_errors",
            "Failed reconcile passes per controller",
            self.errors.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_time_seconds",
            "Duration of reconcile passes per controller",
            self.time.clone(),
        );
    }

    /// Records one pass of `controller`.
    pub fn observe(&self, controller: &'static str, result: PassResult, seconds: f64) {
        self.total
            .get_or_create(&[("controller", controller), ("result", result.label())])
            .inc();
        if result == PassResult::Error {
            self.errors
                .get_or_create(&[("controller", controller)])
                .inc();
        }
        self.time
            .get_or_create(&[("controller", controller)])
            .observe(seconds);
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let leader = Gauge::default();
        registry.register(
            "kmm_leader",
            "1 when this operator process holds the leader Lease and runs the reconcilers",
            leader.clone(),
        );
        let build_info = Gauge::<i64>::default();
        build_info.set(1);
        registry.register(
            "kmm_rs_build_info",
            concat!("kmm-rs operator version ", env!("CARGO_PKG_VERSION")),
            build_info,
        );
        let reconcile = ReconcileMetrics::default();
        reconcile.register(&mut registry);
        Self {
            registry,
            leader,
            reconcile,
        }
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts the caches behind the KMM gauges and registers their collector. The returned future
/// drives the caches and must be polled for as long as the process lives; `synced` turns true
/// once both caches hold a full list.
pub fn kmm_gauges(
    client: kube::Client,
    metrics: &mut Metrics,
    synced: tokio::sync::watch::Sender<bool>,
) -> impl Future<Output = ()> + Send + 'static {
    let (modules, modules_writer) = reflector::store::<Module>();
    let (preflights, preflights_writer) = reflector::store::<PreflightValidation>();
    metrics.registry.register_collector(Box::new(KmmGauges {
        modules: modules.clone(),
        preflights: preflights.clone(),
    }));
    let module_stream = reflector::reflector(
        modules_writer,
        watcher(
            Api::<Module>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|event| async move {
        if let Err(err) = event {
            tracing::warn!("watching Modules for metrics: {err}");
        }
    });
    let preflight_stream = reflector::reflector(
        preflights_writer,
        watcher(
            Api::<PreflightValidation>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|event| async move {
        if let Err(err) = event {
            tracing::warn!("watching PreflightValidations for metrics: {err}");
        }
    });
    async move {
        let wait = async {
            if modules.wait_until_ready().await.is_ok()
                && preflights.wait_until_ready().await.is_ok()
            {
                tracing::info!("metrics caches synced");
                let _ = synced.send(true);
            }
            std::future::pending::<()>().await;
        };
        tokio::join!(module_stream, preflight_stream, wait);
    }
}

/// Go KMM's gauges, from the caches.
#[derive(Debug)]
struct KmmGauges {
    modules: Store<Module>,
    preflights: Store<PreflightValidation>,
}

/// What the gauges show for a set of Modules; pure so that it can be tested on plain data.
#[derive(Debug, Default, PartialEq)]
pub struct ModuleCounts {
    pub modules: i64,
    pub builds: i64,
    pub signs: i64,
    pub device_plugins: i64,
    /// (namespace, name, load args joined by `,`) of Modules that set `modprobe.args`.
    pub modprobe_args: Vec<(String, String, String)>,
}

pub fn count_modules<'a>(modules: impl IntoIterator<Item = &'a Module>) -> ModuleCounts {
    let mut counts = ModuleCounts::default();
    for module in modules {
        counts.modules += 1;
        if module.spec.device_plugin.is_some() {
            counts.device_plugins += 1;
        }
        let Some(loader) = &module.spec.module_loader else {
            continue;
        };
        let container = &loader.container;
        if container.build.is_some() || container.kernel_mappings.iter().any(|m| m.build.is_some())
        {
            counts.builds += 1;
        }
        if container.sign.is_some() || container.kernel_mappings.iter().any(|m| m.sign.is_some()) {
            counts.signs += 1;
        }
        if let Some(args) = &container.modprobe.args {
            counts.modprobe_args.push((
                module.metadata.namespace.clone().unwrap_or_default(),
                module.metadata.name.clone().unwrap_or_default(),
                args.load.join(","),
            ));
        }
    }
    counts.modprobe_args.sort();
    counts
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

impl Collector for KmmGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let modules: Vec<Arc<Module>> = self.modules.state();
        let counts = count_modules(modules.iter().map(|m| m.as_ref()));
        gauge(
            &mut encoder,
            "kmm_module_num",
            "Number of existing KMM Modules",
            counts.modules,
        )?;
        gauge(
            &mut encoder,
            "kmm_in_cluster_build_num",
            "Number of existing KMM Modules with in-cluster build defined",
            counts.builds,
        )?;
        gauge(
            &mut encoder,
            "kmm_in_cluster_sign_num",
            "Number of existing KMM Modules with in-cluster sign defined",
            counts.signs,
        )?;
        gauge(
            &mut encoder,
            "kmm_device_plugin_num",
            "Number of existing KMM Modules with device plugin defined",
            counts.device_plugins,
        )?;
        // Go sets this to 1 once any PreflightValidation was reconciled; here it is 1 while
        // any PreflightValidation exists.
        gauge(
            &mut encoder,
            "kmm_preflight_num",
            "1 if a PreflightValidation exists",
            i64::from(!self.preflights.is_empty()),
        )?;
        let one = ConstGauge::new(1i64);
        let mut family = encoder.encode_descriptor(
            "kmm_modprobe_args",
            "Modprobe load arguments of each Module that sets them",
            None,
            one.metric_type(),
        )?;
        for (namespace, name, args) in &counts.modprobe_args {
            let labels = [
                ("name", name.as_str()),
                ("namespace", namespace.as_str()),
                ("modprobeArgs", args.as_str()),
            ];
            one.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(yaml: &str) -> Module {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn counts_follow_go_kmm() {
        let plain = module(
            "apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata: {name: a, namespace: n}\nspec:\n  selector: {}\n  moduleLoader:\n    container:\n      modprobe: {moduleName: a, args: {load: [x, y]}}\n      kernelMappings:\n        - regexp: '.*'\n          containerImage: r/a:1\n          build:\n            dockerfileConfigMap: {name: d}\n",
        );
        let dp = module(
            "apiVersion: kmm.sigs.x-k8s.io/v1beta1\nkind: Module\nmetadata: {name: b, namespace: n}\nspec:\n  selector: {}\n  devicePlugin:\n    container: {image: dp:1}\n",
        );
        let counts = count_modules([&plain, &dp]);
        assert_eq!(counts.modules, 2);
        assert_eq!(counts.builds, 1);
        assert_eq!(counts.signs, 0);
        assert_eq!(counts.device_plugins, 1);
        assert_eq!(
            counts.modprobe_args,
            vec![("n".into(), "a".into(), "x,y".into())]
        );
    }

    #[test]
    fn reconcile_passes_are_counted_under_controller_runtime_names() {
        let metrics = Metrics::new();
        metrics
            .reconcile
            .clone()
            .observe("module", PassResult::Success, 0.002);
        metrics.reconcile.observe("module", PassResult::Error, 0.5);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                r#"controller_runtime_reconcile_total{controller="module",result="success"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"controller_runtime_reconcile_errors_total{controller="module"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"controller_runtime_reconcile_time_seconds_count{controller="module"} 2"#
            ),
            "{text}"
        );
    }

    #[test]
    fn registry_encodes_the_leader_gauge() {
        let metrics = Metrics::new();
        metrics.leader.set(1);
        let text = metrics.encode().unwrap();
        assert!(text.contains("kmm_leader 1"), "{text}");
    }
}
