//! Histograms kept as bucket counts, and counters and gauges counted on each thread, for a
//! Prometheus endpoint.
//!
//! `metrics-exporter-prometheus` keeps every histogram sample until it is rendered or its
//! upkeep runs: each sample is a store into a growing block list under a `crossbeam` epoch
//! guard; each counter add is two atomic read-modify-writes (the count and a generation), a
//! gauge's a compare-and-swap loop besides. On the gateway's request path such atomics cost
//! tens of nanoseconds each (they wait for the stores before them). The recorder
//! [`BucketHistograms::over`] makes keeps a histogram as what Prometheus reads of it, one count
//! a bucket and a sum, and every counter, gauge and histogram in words each thread adds to on
//! its own (see `tally`): a sample is a load and a store, and a scrape adds the threads up.
//! The tenant-labelled request counter is kept (and rendered) here too, not given to the
//! wrapped recorder, so that a removed tenant's series can be forgotten: the exporter has no
//! way to drop one.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

use super::tally::{self, Sums};

/// Bucket bounds for durations in seconds, 0.5 ms to 30 s: what the gateway binary uses for
/// `tower_fhir_request_duration_seconds` and `tower_fhir_upstream_duration_seconds`.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every histogram of the process kept as Prometheus buckets, and every counter and gauge
/// counted on each thread and given to the recorder it wraps when a scrape asks.
///
/// Wrap your recorder with [`over`](Self::over) and install the result; render the
/// histograms with [`render`](Self::render) (which first gives the wrapped recorder the
/// counters' and gauges' values, as [`publish`](Self::publish) does), then the recorder's own
/// text, on the same page. One counter, `tower_fhir_requests_total` (labelled by tenant, see
/// [`ObserveLayer`](super::ObserveLayer)), is not given to the wrapped recorder: it is counted
/// and rendered here, beside the histograms, so that its series can be forgotten with
/// [`forget_labelled`](Self::forget_labelled) (a removed tenant's), which a recorder's own
/// series cannot. Each thread counts in words of its own, which only it writes: a
/// counter's add, a gauge's change or a histogram's sample through a kept handle is a load and
/// a store (no atomic read-modify-write, no allocation, no lock, no epoch guard); a scrape adds
/// the threads' words up. A thread's words outlive it, taken over by the next thread to start.
///
/// What it gives up:
/// - a fixed set of buckets: no quantiles of its own, no bounds chosen per metric (every
///   histogram has the bounds given to [`new`](Self::new));
/// - the wrapped recorder's settings do not reach histograms: its global labels and unit
///   suffixes apply to counters and gauges only; and no metric goes idle: a histogram, once
///   registered, is rendered for the life of the process, and every counter and gauge is
///   given its value at each publish (the wrapped recorder's idle timeouts never see one
///   idle);
/// - a scrape reads the counts as they are, without stopping samples: a sample being recorded
///   meanwhile may be in `_count` and not yet in `_sum` (one a thread at most). `_count` is
///   always the `+Inf` bucket, and no bucket ever goes down;
/// - the wrapped recorder sees counters and gauges only as they were at the last
///   [`publish`](Self::publish) or [`render`](Self::render): render this first, then its text
///   (a recorder that serves or pushes on its own, such as the exporter's `install`, needs
///   `publish` called on its interval); a gauge's `set` and a counter's `absolute` add every
///   thread's words up, as a scrape does, so use them rarely or keep such metrics elsewhere;
/// - call [`over`](Self::over) once: the counters and gauges are kept here by key, and a
///   second recorder made with it publishes to the first one's handles;
/// - `tower_fhir_requests_total` is rendered as the histograms are (its labels sorted, its
///   name and labels made valid, none of the wrapped recorder's global labels or suffixes),
///   with a `# HELP` line when described.
///
/// Names and label names are rendered with every character Prometheus does not allow made
/// `_`, and series whose names and labels render alike are counted as one. A label named `le`
/// (the bucket's own) is rendered `exported_le`.
///
/// ```
/// use metrics::Recorder;
/// use metrics_exporter_prometheus::PrometheusBuilder;
/// use tower_fhir::ops::{BucketHistograms, DURATION_BUCKETS};
///
/// let prometheus = PrometheusBuilder::new().build_recorder();
/// let counters = prometheus.handle();
/// let histograms = BucketHistograms::new(&DURATION_BUCKETS).unwrap();
/// let recorder = histograms.over(prometheus);
/// // In an application: `metrics::set_global_recorder(recorder)`, then build the layers.
///
/// metrics::with_local_recorder(&recorder, || {
///     metrics::counter!("tower_fhir_requests_total").increment(1);
///     let duration = metrics::histogram!("tower_fhir_request_duration_seconds");
///     duration.record(0.002);
///     duration.record(0.2);
/// });
///
/// // The histograms first: rendering them gives the counters to the exporter.
/// let histograms_text = histograms.render();
/// let page = counters.render() + &histograms_text;
/// assert!(page.contains("tower_fhir_requests_total 1\n"));
/// assert!(page.contains("# TYPE tower_fhir_request_duration_seconds histogram\n"));
/// assert!(page.contains("tower_fhir_request_duration_seconds_bucket{le=\"0.0025\"} 1\n"));
/// assert!(page.contains("tower_fhir_request_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
/// assert!(page.contains("tower_fhir_request_duration_seconds_sum 0.202\n"));
/// assert!(page.contains("tower_fhir_request_duration_seconds_count 2\n"));
/// ```
#[derive(Clone)]
pub struct BucketHistograms {
    shared: Arc<Shared>,
}

struct Shared {
    bounds: Arc<[f64]>,
    families: RwLock<BTreeMap<String, Family<Buckets>>>,
    /// The counters kept here rather than given to the wrapped recorder ([`KEPT_COUNTERS`]),
    /// by name as rendered.
    kept: RwLock<BTreeMap<String, Family<ThreadCounter>>>,
    counters: RwLock<HashMap<Key, Arc<ThreadCounter>>>,
    gauges: RwLock<HashMap<Key, Arc<ThreadGauge>>>,
}

/// The counters rendered here, by the name they are registered with: those whose series may
/// be forgotten ([`BucketHistograms::forget_labelled`]).
const KEPT_COUNTERS: [&str; 1] = ["tower_fhir_requests_total"];

/// The histograms (or kept counters) of one name as rendered.
struct Family<T> {
    /// The first description given with `describe_histogram!` (`describe_counter!`): its
    /// `# HELP` line.
    help: Option<String>,
    /// By labels as rendered (`name="value",` each, sorted by name).
    series: BTreeMap<String, Arc<T>>,
}

impl<T> Default for Family<T> {
    fn default() -> Self {
        Self {
            help: None,
            series: BTreeMap::new(),
        }
    }
}

/// Drops the series of `families` whose labels (as rendered) give `label` one of `values`
/// (rendered too); how many it dropped.
fn forget_in<T>(
    families: &RwLock<BTreeMap<String, Family<T>>>,
    label: &str,
    values: &std::collections::HashSet<String>,
) -> usize {
    let mut forgotten = 0;
    let mut families = families.write().unwrap_or_else(PoisonError::into_inner);
    for family in families.values_mut() {
        family.series.retain(|labels, _| {
            let named = labelled(labels, label).is_some_and(|value| values.contains(value));
            forgotten += usize::from(named);
            !named
        });
    }
    forgotten
}

/// The value (as rendered) that `labels` (`name="value",` each, as rendered) give `label`.
fn labelled<'a>(labels: &'a str, label: &str) -> Option<&'a str> {
    let mut rest = labels;
    while let Some(equals) = rest.find("=\"") {
        let name = &rest[..equals];
        let after = &rest[equals + 2..];
        // The value runs to its first quote not escaped (`\"`); a name holds no quote.
        let mut escaped = false;
        let end = after.char_indices().find_map(|(at, c)| {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => return Some(at),
                _ => {}
            }
            None
        })?;
        if name == label {
            return Some(&after[..end]);
        }
        // Past the quote and the comma.
        rest = after.get(end + 2..)?;
    }
    None
}

/// Bounds that are not finite and strictly increasing, given to [`BucketHistograms::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct InvalidBuckets(String);

impl fmt::Display for InvalidBuckets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "histogram buckets {}", self.0)
    }
}

impl std::error::Error for InvalidBuckets {}

impl BucketHistograms {
    /// Histograms with these upper bounds (`le`), finite and strictly increasing; every
    /// histogram also has the `+Inf` bucket.
    ///
    /// # Errors
    ///
    /// [`InvalidBuckets`] when a bound is not finite or not greater than the one before.
    pub fn new(bounds: &[f64]) -> Result<Self, InvalidBuckets> {
        if let Some(bound) = bounds.iter().find(|bound| !bound.is_finite()) {
            return Err(InvalidBuckets(format!("must be finite, not {bound}")));
        }
        if let Some(pair) = bounds.windows(2).find(|pair| pair[0] >= pair[1]) {
            return Err(InvalidBuckets(format!(
                "must increase, but {} comes after {}",
                pair[1], pair[0]
            )));
        }
        Ok(Self {
            shared: Arc::new(Shared {
                bounds: bounds.into(),
                families: RwLock::default(),
                kept: RwLock::default(),
                counters: RwLock::default(),
                gauges: RwLock::default(),
            }),
        })
    }

    /// A recorder that keeps histograms here, and counts counters and gauges here for `inner`
    /// (see [`publish`](Self::publish)).
    pub fn over<R: Recorder>(&self, inner: R) -> WithBucketHistograms<R> {
        WithBucketHistograms {
            inner,
            histograms: self.clone(),
        }
    }

    /// The histogram named by `key`, made on first use.
    fn histogram(&self, key: &Key) -> Arc<Buckets> {
        one_series(
            &self.shared.families,
            metric_name(key.name()),
            series_labels(key, true),
            || Buckets::new(Arc::clone(&self.shared.bounds)),
        )
    }

    /// The counter named by `key`, one of [`KEPT_COUNTERS`], made on first use: counted and
    /// rendered here.
    fn kept_counter(&self, key: &Key) -> Arc<ThreadCounter> {
        one_series(
            &self.shared.kept,
            metric_name(key.name()),
            series_labels(key, false),
            || ThreadCounter {
                id: tally::ids(1),
                raised: AtomicU64::new(0),
                inner: Counter::noop(),
            },
        )
    }

    /// Forgets the series whose label `label` has one of `values`, of every histogram and of
    /// `tower_fhir_requests_total`: they are no longer rendered, their memory is given back
    /// once no handle holds them, and a series of the same name and labels registered later
    /// (a tenant added again) is a new one, counted from zero. Returns how many it forgot.
    ///
    /// For a removed tenant's series, `forget_labelled("tenant", &[&tenant.to_string()])`,
    /// then [`ObserveLayer::forget_tenants`](super::ObserveLayer::forget_tenants) (in that
    /// order: a request counted between the two then counts in the series forgotten, not in
    /// a handle the layer would keep to a series no longer rendered). Give Prometheus a
    /// scrape or two of the final counts first: call it some minutes after the tenant went.
    /// Counters and gauges given to the wrapped recorder are not forgotten (it has no way to
    /// drop a series).
    ///
    /// ```
    /// use metrics::Recorder;
    /// use tower_fhir::ops::{BucketHistograms, DURATION_BUCKETS};
    ///
    /// let histograms = BucketHistograms::new(&DURATION_BUCKETS).unwrap();
    /// let recorder = histograms.over(metrics::NoopRecorder);
    /// let count = |tenant: &'static str| {
    ///     metrics::with_local_recorder(&recorder, || {
    ///         metrics::counter!("tower_fhir_requests_total", "tenant" => tenant).increment(1);
    ///     });
    /// };
    /// count("gone");
    /// count("gone");
    /// count("kept");
    /// let page = histograms.render();
    /// assert!(page.contains("tower_fhir_requests_total{tenant=\"gone\"} 2\n"));
    ///
    /// assert_eq!(histograms.forget_labelled("tenant", &["gone"]), 1);
    /// let page = histograms.render();
    /// assert!(!page.contains("gone"), "{page}");
    /// assert!(page.contains("tower_fhir_requests_total{tenant=\"kept\"} 1\n"));
    /// // Counted again (the tenant added back): from zero.
    /// count("gone");
    /// assert!(histograms.render().contains("tower_fhir_requests_total{tenant=\"gone\"} 1\n"));
    /// ```
    pub fn forget_labelled(&self, label: &str, values: &[&str]) -> usize {
        let values: std::collections::HashSet<String> =
            values.iter().map(|value| label_value(value)).collect();
        if values.is_empty() {
            return 0;
        }
        let counters = forget_in(&self.shared.kept, &label_name(label), &values);
        let histogram_label = match label_name(label) {
            le if le == "le" => "exported_le".to_owned(),
            name => name,
        };
        counters + forget_in(&self.shared.families, &histogram_label, &values)
    }

    /// The counter named by `key`, made (and registered with `inner`) on first use.
    fn counter(&self, key: &Key, make: impl FnOnce() -> Counter) -> Arc<ThreadCounter> {
        one_of(&self.shared.counters, key, || ThreadCounter {
            id: tally::ids(1),
            raised: AtomicU64::new(0),
            inner: make(),
        })
    }

    /// The gauge named by `key`, made (and registered with `inner`) on first use.
    fn gauge(&self, key: &Key, make: impl FnOnce() -> Gauge) -> Arc<ThreadGauge> {
        one_of(&self.shared.gauges, key, || ThreadGauge {
            id: tally::ids(1),
            base: Mutex::new(0.0),
            inner: make(),
        })
    }

    /// Gives the wrapped recorder every counter's and gauge's value now (the threads' words
    /// added up): what [`render`](Self::render) does first. Call it before rendering that
    /// recorder's text, or on a recorder that pushes, before it pushes.
    pub fn publish(&self) {
        let sums = Sums::now();
        let counters: Vec<_> = read(&self.shared.counters).values().cloned().collect();
        for counter in counters {
            counter.inner.absolute(counter.value(&sums));
        }
        let gauges: Vec<_> = read(&self.shared.gauges).values().cloned().collect();
        for gauge in gauges {
            gauge.inner.set(gauge.value(&sums));
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Family<Buckets>>> {
        read(&self.shared.families)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Family<Buckets>>> {
        self.shared
            .families
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every histogram in the Prometheus text format (0.0.4): `_bucket` lines with cumulative
    /// counts, `_sum` and `_count`, after a `# HELP` (when described) and a `# TYPE` line;
    /// before them, the counters kept here (`tower_fhir_requests_total`). First
    /// [`publish`](Self::publish)es the other counters and gauges to the wrapped recorder.
    pub fn render(&self) -> String {
        let mut page = String::new();
        self.render_into(&mut page);
        page
    }

    /// The same, appended to `page`.
    pub fn render_into(&self, page: &mut String) {
        self.publish();
        let counters = listed(&self.shared.kept);
        // The series are listed under the lock and read after it: registering one never
        // waits for a scrape's formatting.
        let families = listed(&self.shared.families);
        let sums = Sums::now();
        for (name, help, series) in counters {
            if let Some(text) = help {
                let _ = writeln!(page, "# HELP {name} {text}");
            }
            let _ = writeln!(page, "# TYPE {name} counter");
            for (labels, counter) in series {
                let labels = labels.trim_end_matches(',');
                let value = counter.value(&sums);
                let _ = if labels.is_empty() {
                    writeln!(page, "{name} {value}")
                } else {
                    writeln!(page, "{name}{{{labels}}} {value}")
                };
            }
        }
        for (name, help, series) in families {
            if let Some(text) = help {
                let _ = writeln!(page, "# HELP {name} {text}");
            }
            let _ = writeln!(page, "# TYPE {name} histogram");
            for (labels, buckets) in series {
                let (counts, sum) = buckets.snapshot(&sums);
                let mut cumulative = 0;
                for (at, count) in counts.iter().enumerate() {
                    cumulative += count;
                    let _ = match self.shared.bounds.get(at) {
                        Some(bound) => {
                            writeln!(page, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}")
                        }
                        None => {
                            writeln!(page, "{name}_bucket{{{labels}le=\"+Inf\"}} {cumulative}")
                        }
                    };
                }
                let labels = labels.trim_end_matches(',');
                let braced = if labels.is_empty() {
                    String::new()
                } else {
                    format!("{{{labels}}}")
                };
                let _ = writeln!(page, "{name}_sum{braced} {}", Number(sum));
                let _ = writeln!(page, "{name}_count{braced} {cumulative}");
            }
        }
    }
}

impl fmt::Debug for BucketHistograms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BucketHistograms")
            .field("bounds", &self.shared.bounds)
            .field("names", &self.read().len())
            .finish()
    }
}

/// The recorder [`BucketHistograms::over`] makes: histograms kept as buckets, counters and
/// gauges counted on each thread for the recorder wrapped.
#[derive(Debug)]
pub struct WithBucketHistograms<R> {
    inner: R,
    histograms: BucketHistograms,
}

impl<R> WithBucketHistograms<R> {
    /// The histograms, to render.
    pub fn histograms(&self) -> &BucketHistograms {
        &self.histograms
    }
}

impl<R: Recorder> Recorder for WithBucketHistograms<R> {
    /// Keeps the first description of a counter kept here for its `# HELP` line; gives any
    /// other's to the wrapped recorder.
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if KEPT_COUNTERS.contains(&key.as_str()) {
            let mut kept = self
                .histograms
                .shared
                .kept
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let family = kept.entry(metric_name(key.as_str())).or_default();
            family.help.get_or_insert_with(|| help_text(&description));
        } else {
            self.inner.describe_counter(key, unit, description);
        }
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    /// Keeps the first description of a name for its `# HELP` line; the unit is not added to
    /// the name (name the metric with its unit, as `_seconds`).
    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        let mut families = self.histograms.write();
        let family = families.entry(metric_name(key.as_str())).or_default();
        family.help.get_or_insert_with(|| help_text(&description));
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if KEPT_COUNTERS.contains(&key.name()) {
            return Counter::from_arc(self.histograms.kept_counter(key));
        }
        Counter::from_arc(
            self.histograms
                .counter(key, || self.inner.register_counter(key, metadata)),
        )
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(
            self.histograms
                .gauge(key, || self.inner.register_gauge(key, metadata)),
        )
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(self.histograms.histogram(key))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// A name's series, listed: its name, `# HELP` text, and labels and handle each.
type Listed<T> = (String, Option<String>, Vec<(String, Arc<T>)>);

/// Every family of `families` that has a series (a name described and never recorded has no
/// lines), listed under the lock.
fn listed<T>(families: &RwLock<BTreeMap<String, Family<T>>>) -> Vec<Listed<T>> {
    read(families)
        .iter()
        .filter(|(_, family)| !family.series.is_empty())
        .map(|(name, family)| {
            let series = family
                .series
                .iter()
                .map(|(labels, series)| (labels.clone(), Arc::clone(series)))
                .collect();
            (name.clone(), family.help.clone(), series)
        })
        .collect()
}

/// The series `labels` of the family `name` in `families`, made by `make` if there is none.
fn one_series<T>(
    families: &RwLock<BTreeMap<String, Family<T>>>,
    name: String,
    labels: String,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    if let Some(found) = read(families)
        .get(&name)
        .and_then(|family| family.series.get(&labels))
    {
        return Arc::clone(found);
    }
    let mut families = families.write().unwrap_or_else(PoisonError::into_inner);
    let series = &mut families.entry(name).or_default().series;
    Arc::clone(series.entry(labels).or_insert_with(|| Arc::new(make())))
}

/// `key`'s labels as rendered: `name="value",` each, sorted by name; for a histogram, a label
/// named `le` (the bucket's own) renamed `exported_le`.
fn series_labels(key: &Key, histogram: bool) -> String {
    let mut labels: Vec<(String, String)> = key
        .labels()
        .map(|label| {
            let name = match label_name(label.key()) {
                le if histogram && le == "le" => "exported_le".to_owned(),
                name => name,
            };
            (name, label_value(label.value()))
        })
        .collect();
    labels.sort();
    labels
        .iter()
        .map(|(name, value)| format!("{name}=\"{value}\","))
        .collect()
}

/// The entry for `key` in `map`, made by `make` if there is none.
fn one_of<T>(map: &RwLock<HashMap<Key, Arc<T>>>, key: &Key, make: impl FnOnce() -> T) -> Arc<T> {
    if let Some(found) = read(map).get(key) {
        return Arc::clone(found);
    }
    let mut map = map.write().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(map.entry(key.clone()).or_insert_with(|| Arc::new(make())))
}

/// A counter each thread adds to in its own word; its value (published to `inner`) is their
/// sum and what `absolute` raised it by.
struct ThreadCounter {
    id: usize,
    raised: AtomicU64,
    inner: Counter,
}

impl ThreadCounter {
    fn value(&self, sums: &Sums) -> u64 {
        sums.u64(self.id)
            .wrapping_add(self.raised.load(Ordering::Relaxed))
    }
}

impl Drop for ThreadCounter {
    /// Gives its word back: no handle is left to add to it (a forgotten series').
    fn drop(&mut self) {
        tally::release(self.id, 1);
    }
}

impl CounterFn for ThreadCounter {
    fn increment(&self, value: u64) {
        tally::with_adder(|adder| adder.add(self.id, value));
    }

    /// Raises the counter to `value` if it is below: by then the threads' words can only
    /// have grown, so it stays at least `value`.
    fn absolute(&self, value: u64) {
        let counted = Sums::now().u64(self.id);
        self.raised
            .fetch_max(value.saturating_sub(counted), Ordering::Relaxed);
    }
}

/// A gauge each thread changes in its own word; its value (published to `inner`) is `base`
/// plus their sum, and `set` moves `base`.
struct ThreadGauge {
    id: usize,
    base: Mutex<f64>,
    inner: Gauge,
}

impl ThreadGauge {
    fn value(&self, sums: &Sums) -> f64 {
        *self.base.lock().unwrap_or_else(PoisonError::into_inner) + sums.f64(self.id)
    }
}

impl GaugeFn for ThreadGauge {
    fn increment(&self, value: f64) {
        tally::with_adder(|adder| adder.add_f64(self.id, value));
    }

    fn decrement(&self, value: f64) {
        tally::with_adder(|adder| adder.add_f64(self.id, -value));
    }

    fn set(&self, value: f64) {
        let mut base = self.base.lock().unwrap_or_else(PoisonError::into_inner);
        *base = value - Sums::now().f64(self.id);
    }
}

/// One histogram: words (see `tally`) for a count a bucket (the bounds', then `+Inf`) and the
/// sum, from `first` on.
struct Buckets {
    bounds: Arc<[f64]>,
    first: usize,
}

impl Buckets {
    fn new(bounds: Arc<[f64]>) -> Self {
        let first = tally::ids(bounds.len() + 2);
        Self { bounds, first }
    }

    /// The sum's word.
    fn sum(&self) -> usize {
        self.first + self.bounds.len() + 1
    }

    /// The bucket a value counts in: the first bound it does not exceed, else `+Inf` (NaN
    /// too, as Prometheus' own clients count it).
    fn bucket_of(&self, value: f64) -> usize {
        if value.is_nan() {
            self.bounds.len()
        } else {
            self.bounds.partition_point(|&bound| bound < value)
        }
    }

    fn add(&self, value: f64, times: u64) {
        let bucket = self.first + self.bucket_of(value);
        // Times as a float: `record_many` takes a `usize`, far within f64's exact integers
        // for any count a caller has.
        #[allow(clippy::cast_precision_loss)]
        let added = value * times as f64;
        tally::with_adder(|adder| {
            adder.add(bucket, times);
            adder.add_f64(self.sum(), added);
        });
    }

    /// The counts a bucket (not cumulative) and the sum, over every thread.
    fn snapshot(&self, sums: &Sums) -> (Vec<u64>, f64) {
        let counts = (0..=self.bounds.len())
            .map(|bucket| sums.u64(self.first + bucket))
            .collect();
        (counts, sums.f64(self.sum()))
    }
}

impl Drop for Buckets {
    /// Gives its words back: no handle is left to add to them (a forgotten series').
    fn drop(&mut self) {
        tally::release(self.first, self.bounds.len() + 2);
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        self.add(value, 1);
    }

    fn record_many(&self, value: f64, count: usize) {
        self.add(value, count as u64);
    }
}

/// A float as Prometheus writes it: `+Inf`, `-Inf`, `NaN`, or Rust's shortest form that reads
/// back the same, never in exponent notation.
struct Number(f64);

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            value if value.is_nan() => f.write_str("NaN"),
            f64::INFINITY => f.write_str("+Inf"),
            f64::NEG_INFINITY => f.write_str("-Inf"),
            value => write!(f, "{value}"),
        }
    }
}

/// A metric name with every character Prometheus does not allow (`[a-zA-Z_:][a-zA-Z0-9_:]*`)
/// made `_`.
fn metric_name(name: &str) -> String {
    sanitized(name, |c| c == ':')
}

/// A label name with every character Prometheus does not allow (`[a-zA-Z_][a-zA-Z0-9_]*`)
/// made `_`.
fn label_name(name: &str) -> String {
    sanitized(name, |_| false)
}

fn sanitized(name: &str, also: impl Fn(char) -> bool) -> String {
    let mut text: String = name
        .chars()
        .enumerate()
        .map(|(at, c)| {
            let allowed =
                c.is_ascii_alphabetic() || c == '_' || also(c) || (at > 0 && c.is_ascii_digit());
            if allowed {
                c
            } else {
                '_'
            }
        })
        .collect();
    if text.is_empty() {
        text.push('_');
    }
    text
}

/// A label value with `\`, `"` and line feeds escaped.
fn label_value(value: &str) -> String {
    escaped(value, true)
}

/// A description with `\` and line feeds escaped.
fn help_text(text: &str) -> String {
    escaped(text, false)
}

fn escaped(text: &str, quotes: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The gateway binary's recorder (with one bucket bound, 1): the exporter's text, the
    /// histograms, the recorder.
    pub(crate) fn over_prometheus() -> (
        metrics_exporter_prometheus::PrometheusHandle,
        BucketHistograms,
        WithBucketHistograms<metrics_exporter_prometheus::PrometheusRecorder>,
    ) {
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let text = prometheus.handle();
        let histograms = BucketHistograms::new(&[1.0]).unwrap();
        let recorder = histograms.over(prometheus);
        (text, histograms, recorder)
    }

    fn recorded(bounds: &[f64], record: impl FnOnce()) -> String {
        let histograms = BucketHistograms::new(bounds).unwrap();
        let recorder = histograms.over(metrics::NoopRecorder);
        metrics::with_local_recorder(&recorder, record);
        histograms.render()
    }

    #[test]
    fn a_value_counts_in_the_first_bucket_it_does_not_exceed() {
        let page = recorded(&[1.0, 2.0], || {
            let h = metrics::histogram!("h");
            for value in [0.5, 1.0, 1.5, 2.0, 2.5, -3.0] {
                h.record(value);
            }
        });
        assert_eq!(
            page,
            "# TYPE h histogram\n\
             h_bucket{le=\"1\"} 3\n\
             h_bucket{le=\"2\"} 5\n\
             h_bucket{le=\"+Inf\"} 6\n\
             h_sum 4.5\n\
             h_count 6\n"
        );
    }

    #[test]
    fn nan_counts_in_inf_and_makes_the_sum_nan() {
        let page = recorded(&[1.0], || {
            metrics::histogram!("h").record(f64::NAN);
        });
        assert!(page.contains("h_bucket{le=\"1\"} 0\n"), "{page}");
        assert!(page.contains("h_bucket{le=\"+Inf\"} 1\n"), "{page}");
        assert!(page.contains("h_sum NaN\n"), "{page}");
    }

    #[test]
    fn record_many_counts_each_time() {
        let histograms = BucketHistograms::new(&[1.0]).unwrap();
        let key = Key::from_name("h");
        histograms.histogram(&key).record_many(0.25, 4);
        let page = histograms.render();
        assert!(page.contains("h_bucket{le=\"1\"} 4\n"), "{page}");
        assert!(page.contains("h_sum 1\n"), "{page}");
    }

    #[test]
    fn labels_are_escaped_and_sorted_and_series_of_a_name_share_one_type_line() {
        let page = recorded(&[], || {
            metrics::describe_histogram!("h", "a \\ help\nline");
            metrics::describe_histogram!("h", "a later description is not kept");
            metrics::histogram!("h", "path" => "a\"b\\c\nd", "2bad-key" => "x").record(1.0);
            metrics::histogram!("h", "path" => "plain").record(1.0);
            metrics::histogram!("bad name").record(1.0);
            metrics::describe_histogram!("described_only", "never recorded");
        });
        assert_eq!(
            page,
            "# TYPE bad_name histogram\n\
             bad_name_bucket{le=\"+Inf\"} 1\n\
             bad_name_sum 1\n\
             bad_name_count 1\n\
             # HELP h a \\\\ help\\nline\n\
             # TYPE h histogram\n\
             h_bucket{_bad_key=\"x\",path=\"a\\\"b\\\\c\\nd\",le=\"+Inf\"} 1\n\
             h_sum{_bad_key=\"x\",path=\"a\\\"b\\\\c\\nd\"} 1\n\
             h_count{_bad_key=\"x\",path=\"a\\\"b\\\\c\\nd\"} 1\n\
             h_bucket{path=\"plain\",le=\"+Inf\"} 1\n\
             h_sum{path=\"plain\"} 1\n\
             h_count{path=\"plain\"} 1\n"
        );
    }

    #[test]
    fn series_that_render_alike_are_one_and_a_label_le_is_renamed() {
        let page = recorded(&[1.0], || {
            metrics::describe_histogram!("a.b", "described under another spelling");
            metrics::histogram!("a-b").record(0.5);
            metrics::histogram!("a.b").record(0.5);
            metrics::histogram!("a_b").record(2.0);
            metrics::histogram!("a_b", "x" => "1", "y" => "2").record(0.5);
            metrics::histogram!("a_b", "y" => "2", "x" => "1").record(0.5);
            metrics::histogram!("a_b", "le" => "7").record(0.5);
        });
        assert_eq!(page.matches("# TYPE a_b histogram\n").count(), 1, "{page}");
        assert_eq!(
            page.matches("# HELP a_b described under another spelling\n")
                .count(),
            1,
            "{page}"
        );
        assert!(page.contains("a_b_count 3\n"), "{page}");
        assert!(page.contains("a_b_bucket{le=\"1\"} 2\n"), "{page}");
        assert!(page.contains("a_b_count{x=\"1\",y=\"2\"} 2\n"), "{page}");
        assert!(
            page.contains("a_b_bucket{exported_le=\"7\",le=\"1\"} 1\n"),
            "{page}"
        );
        let series = page.lines().filter(|l| l.starts_with("a_b_count")).count();
        assert_eq!(series, 3, "{page}");
    }

    #[test]
    fn bounds_must_be_finite_and_increasing() {
        assert!(BucketHistograms::new(&[]).is_ok());
        assert!(BucketHistograms::new(&DURATION_BUCKETS).is_ok());
        let error = BucketHistograms::new(&[1.0, 1.0]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "histogram buckets must increase, but 1 comes after 1"
        );
        assert!(BucketHistograms::new(&[2.0, 1.0]).is_err());
        assert!(BucketHistograms::new(&[1.0, f64::INFINITY]).is_err());
        assert!(BucketHistograms::new(&[f64::NAN]).is_err());
    }

    #[test]
    fn counters_and_gauges_go_to_the_inner_recorder() {
        let (inner, _histograms, recorder) = over_prometheus();
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_counter!("c", "counted");
            metrics::counter!("c").increment(2);
            metrics::gauge!("g").set(3.0);
            metrics::histogram!("h").record(0.5);
        });
        assert!(
            !inner.render().contains("c 2\n"),
            "counted on the threads until published"
        );
        recorder.histograms().publish();
        let text = inner.render();
        assert!(text.contains("# HELP c counted\n"), "{text}");
        assert!(text.contains("c 2\n"), "{text}");
        assert!(text.contains("g 3\n"), "{text}");
        assert!(
            !text.contains("h_"),
            "histograms stay out of the inner recorder: {text}"
        );
        assert!(recorder.histograms().render().contains("h_count 1\n"));
    }

    #[test]
    fn counters_and_gauges_count_every_thread_and_absolute_and_set_hold() {
        let (inner, histograms, recorder) = over_prometheus();
        let (counter, gauge, labelled) = metrics::with_local_recorder(&recorder, || {
            (
                metrics::counter!("c"),
                metrics::gauge!("g"),
                metrics::counter!("c", "tenant" => "t"),
            )
        });
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1_000 {
                        counter.increment(2);
                        gauge.increment(1.0);
                    }
                    gauge.decrement(500.0);
                });
            }
        });
        // The same key gives the same counter; another label, another one.
        metrics::with_local_recorder(&recorder, || metrics::counter!("c").increment(1));
        labelled.increment(7);
        let page = |histograms: &BucketHistograms| {
            histograms.publish();
            inner.render()
        };
        let text = page(&histograms);
        assert!(text.contains("c 8001\n"), "{text}");
        assert!(text.contains("c{tenant=\"t\"} 7\n"), "{text}");
        assert!(text.contains("g 2000\n"), "{text}");

        counter.absolute(10_000);
        counter.absolute(9_000);
        gauge.set(3.0);
        gauge.increment(0.5);
        let text = page(&histograms);
        assert!(text.contains("c 10000\n"), "raised to the absolute: {text}");
        assert!(text.contains("g 3.5\n"), "set, then changed: {text}");
        counter.increment(1);
        let text = page(&histograms);
        assert!(text.contains("c 10001\n"), "counts on from there: {text}");
        counter.absolute(5);
        assert!(page(&histograms).contains("c 10001\n"), "never lowered");
    }

    #[test]
    fn the_request_counter_is_kept_here_and_its_series_can_be_forgotten() {
        let (inner, histograms, recorder) = over_prometheus();
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_counter!("tower_fhir_requests_total", "Requests answered");
            let requests = |tenant: &'static str, class: &'static str| metrics::counter!("tower_fhir_requests_total", "tenant" => tenant, "status_class" => class);
            requests("a", "2xx").increment(2);
            requests("a", "4xx").increment(1);
            requests("b", "2xx").increment(5);
            metrics::counter!("tower_fhir_requests_total").increment(7);
            metrics::counter!("other_total", "tenant" => "a").increment(1);
            metrics::histogram!("h", "tenant" => "a").record(0.5);
            metrics::histogram!("h", "tenant" => "b").record(0.5);
        });
        let page = histograms.render();
        let exporter = inner.render();
        assert!(
            !exporter.contains("tower_fhir_requests_total"),
            "{exporter}"
        );
        assert!(
            exporter.contains("other_total{tenant=\"a\"} 1\n"),
            "{exporter}"
        );
        assert!(
            page.starts_with(
                "# HELP tower_fhir_requests_total Requests answered\n\
                 # TYPE tower_fhir_requests_total counter\n\
                 tower_fhir_requests_total 7\n\
                 tower_fhir_requests_total{status_class=\"2xx\",tenant=\"a\"} 2\n\
                 tower_fhir_requests_total{status_class=\"2xx\",tenant=\"b\"} 5\n\
                 tower_fhir_requests_total{status_class=\"4xx\",tenant=\"a\"} 1\n\
                 # TYPE h histogram\n"
            ),
            "{page}"
        );

        assert_eq!(histograms.forget_labelled("tenant", &["a", "c"]), 3);
        assert_eq!(histograms.forget_labelled("tenant", &[]), 0);
        let page = histograms.render();
        assert!(!page.contains("tenant=\"a\""), "{page}");
        assert!(page.contains("tower_fhir_requests_total{status_class=\"2xx\",tenant=\"b\"} 5\n"));
        assert!(page.contains("h_count{tenant=\"b\"} 1\n"), "{page}");
        assert!(page.contains("tower_fhir_requests_total 7\n"), "{page}");
        assert!(
            inner.render().contains("other_total{tenant=\"a\"} 1\n"),
            "the exporter's own are not forgotten"
        );
        // Registered again: a new series, from zero.
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("tower_fhir_requests_total", "tenant" => "a", "status_class" => "2xx")
                .increment(1);
        });
        assert!(histograms
            .render()
            .contains("tower_fhir_requests_total{status_class=\"2xx\",tenant=\"a\"} 1\n"));
    }

    #[test]
    fn a_label_is_read_from_rendered_labels_past_escaped_quotes() {
        let labels = "a=\"x\\\",tenant=\\\"t\\\\\",b=\"\",tenant=\"t\",";
        assert_eq!(labelled(labels, "a"), Some("x\\\",tenant=\\\"t\\\\"));
        assert_eq!(labelled(labels, "b"), Some(""));
        assert_eq!(labelled(labels, "tenant"), Some("t"));
        assert_eq!(labelled(labels, "c"), None);
        assert_eq!(labelled("", "a"), None);
        assert_eq!(labelled("a=\"unended", "a"), None);
        // Forgetting by a value that holds quotes and a comma finds that value alone.
        let histograms = BucketHistograms::new(&[]).unwrap();
        let recorder = histograms.over(metrics::NoopRecorder);
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("h", "a" => "x\",tenant=\"t").record(1.0);
            metrics::histogram!("h", "tenant" => "t").record(1.0);
        });
        assert_eq!(histograms.forget_labelled("tenant", &["t"]), 1);
        assert_eq!(histograms.render().matches("h_count").count(), 1);
        assert_eq!(histograms.forget_labelled("a", &["x\",tenant=\"t"]), 1);
        assert_eq!(histograms.render(), "");
    }

    #[test]
    fn every_thread_s_samples_are_counted_once() {
        let histograms = BucketHistograms::new(&DURATION_BUCKETS).unwrap();
        let h = histograms.histogram(&Key::from_name("h"));
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let h = &h;
                scope.spawn(move || {
                    for _ in 0..10_000 {
                        h.record(if thread % 2 == 0 { 0.25 } else { 40.0 });
                    }
                });
            }
        });
        let page = histograms.render();
        assert!(page.contains("h_bucket{le=\"0.1\"} 0\n"), "{page}");
        assert!(page.contains("h_bucket{le=\"0.25\"} 40000\n"), "{page}");
        assert!(page.contains("h_bucket{le=\"30\"} 40000\n"), "{page}");
        assert!(page.contains("h_bucket{le=\"+Inf\"} 80000\n"), "{page}");
        assert!(page.contains("h_count 80000\n"), "{page}");
        assert!(page.contains("h_sum 1610000\n"), "{page}");
    }
}
