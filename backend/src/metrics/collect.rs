//! What a scrape shows: `prometheus-client`'s custom [`Collector`] over the
//! daemon's own counters, read at scrape time
//! ([`Daemon::metrics_samples`]). Names follow Prometheus' conventions: the
//! `sluice_` prefix, base units (`_bytes`, `_seconds`), `_total` on counters
//! (the encoder adds it).

use std::sync::Weak;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::daemon::{Daemon, ExportSample, MetricsSamples};
use crate::export::{exported_latency_buckets, ErrorKind, OpKind, QueueSnapshot};

/// A registry whose one collector reads `daemon` at every scrape.
pub(super) fn registry(daemon: Weak<Daemon>, start_time_seconds: f64) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector {
        daemon,
        start_time_seconds,
        le_buckets: exported_latency_buckets().collect(),
    }));
    registry
}

#[derive(Debug)]
struct DaemonCollector {
    daemon: Weak<Daemon>,
    start_time_seconds: f64,
    /// The latency buckets exported as `le` bounds.
    le_buckets: Vec<usize>,
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One counter per queue of every export: its value from a queue's
/// counters.
struct QueueCounter {
    name: &'static str,
    help: &'static str,
    value: fn(&QueueSnapshot) -> u64,
}

/// Completed requests by operation, with node_exporter's names where it
/// has them.
const COMPLETED: [(OpKind, &str, &str); 6] = [
    (
        OpKind::Read,
        "sluice_reads_completed",
        "Reads completed successfully.",
    ),
    (
        OpKind::Write,
        "sluice_writes_completed",
        "Writes (FUA or not) completed successfully.",
    ),
    (
        OpKind::Flush,
        "sluice_flushes_completed",
        "Flushes completed successfully.",
    ),
    (
        OpKind::Discard,
        "sluice_discards_completed",
        "Discards completed successfully.",
    ),
    (
        OpKind::WriteZeroes,
        "sluice_write_zeroes_completed",
        "Write-zeroes completed successfully.",
    ),
    (
        OpKind::Other,
        "sluice_other_requests_completed",
        "Requests answered without a block operation (virtio-blk GET_ID).",
    ),
];

const BYTES: [QueueCounter; 2] = [
    QueueCounter {
        name: "sluice_read_bytes",
        help: "Bytes read by reads completed successfully.",
        value: |q| q.bytes_read,
    },
    QueueCounter {
        name: "sluice_written_bytes",
        help: "Bytes written by writes completed successfully.",
        value: |q| q.bytes_written,
    },
];

impl Collector for DaemonCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut g = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            None,
            MetricType::Gauge,
        )?;
        g.encode_gauge(&self.start_time_seconds)?;
        let mut g = encoder.encode_descriptor(
            "sluice_build_info",
            "The running sluice's version; the value is always 1.",
            None,
            MetricType::Gauge,
        )?;
        g.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?
            .encode_gauge(&1u64)?;
        // A daemon that is gone (the process is exiting) has nothing more.
        let Some(daemon) = self.daemon.upgrade() else {
            return Ok(());
        };
        let samples = daemon.metrics_samples();
        drop(daemon);
        encode_exports(&mut encoder, &samples, &self.le_buckets)?;
        encode_nodes(&mut encoder, &samples)?;
        encode_jobs(&mut encoder, &samples)
    }
}

/// Each queue's labels: the export's, and `queue`.
fn queue_labels<'a>(x: &'a ExportSample, queue: &'a str) -> Labels<'a> {
    let mut l = export_labels(x);
    l.push(("queue", queue));
    l
}

fn export_labels(x: &ExportSample) -> Labels<'_> {
    vec![("export", &x.name), ("node", &x.node), ("type", x.kind)]
}

fn counter<S: EncodeLabelSet>(
    m: &mut MetricEncoder<'_>,
    labels: &S,
    v: impl prometheus_client::encoding::EncodeCounterValue,
) -> Result<(), std::fmt::Error> {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// Per queue counters; per export the latency histogram.
fn encode_exports(
    encoder: &mut DescriptorEncoder,
    s: &MetricsSamples,
    le_buckets: &[usize],
) -> Result<(), std::fmt::Error> {
    // Queue indices as label values, once.
    let most = s.exports.iter().map(|x| x.queues.len()).max().unwrap_or(0);
    let queue_names: Vec<String> = (0..most).map(|q| q.to_string()).collect();
    let each_queue =
        |f: &mut dyn FnMut(&ExportSample, &str, &QueueSnapshot) -> std::fmt::Result| {
            for x in &s.exports {
                for (q, c) in x.queues.iter().enumerate() {
                    f(x, &queue_names[q], c)?;
                }
            }
            Ok(())
        };
    for (op, name, help) in COMPLETED {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        each_queue(&mut |x, q, c| counter(&mut m, &queue_labels(x, q), c.completed[op as usize]))?;
    }
    for QueueCounter { name, help, value } in BYTES {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        each_queue(&mut |x, q, c| counter(&mut m, &queue_labels(x, q), value(c)))?;
    }
    let mut m = encoder.encode_descriptor(
        "sluice_request_errors",
        "Requests answered with an error, by kind: io (the backing device or file failed it), \
         unsupported (an operation the export or node does not offer), bad_request (malformed or \
         out of range), shutdown (the export was draining).",
        None,
        MetricType::Counter,
    )?;
    each_queue(&mut |x, q, c| {
        for kind in ErrorKind::ALL {
            let mut l = queue_labels(x, q);
            l.push(("kind", kind.label()));
            counter(&mut m, &l, c.failed[kind as usize])?;
        }
        Ok(())
    })?;
    let mut m = encoder.encode_descriptor(
        "sluice_requests_in_flight",
        "Requests taken from the consumer and not yet answered.",
        None,
        MetricType::Gauge,
    )?;
    each_queue(&mut |x, q, c| {
        m.encode_family(&queue_labels(x, q))?
            .encode_gauge(&c.in_flight)
    })?;
    let mut m = encoder.encode_descriptor(
        "sluice_queue_polling_seconds",
        "Time the queue's thread worked: vhost-user, in its polling loop (requests and the \
         busy-poll window); ublk, handling a batch of completions from its ring.",
        None,
        MetricType::Counter,
    )?;
    each_queue(&mut |x, q, c| counter(&mut m, &queue_labels(x, q), c.polling_ns as f64 / 1e9))?;
    let mut m = encoder.encode_descriptor(
        "sluice_queue_sleeping_seconds",
        "Time the queue's thread was blocked waiting for work; a wait is counted when it ends.",
        None,
        MetricType::Counter,
    )?;
    each_queue(&mut |x, q, c| counter(&mut m, &queue_labels(x, q), c.sleeping_ns as f64 / 1e9))?;
    let mut m = encoder.encode_descriptor(
        "sluice_request_duration_seconds",
        "Time from taking a request to answering it, over all queues of the export.",
        None,
        MetricType::Histogram,
    )?;
    for x in &s.exports {
        let buckets = x.latency.grouped(le_buckets);
        m.encode_family(&export_labels(x))?
            .encode_histogram::<NoLabelSet>(
                x.latency.sum_ns as f64 / 1e9,
                x.latency.count(),
                &buckets,
                None,
            )?;
    }
    Ok(())
}

fn encode_nodes(encoder: &mut DescriptorEncoder, s: &MetricsSamples) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(
        "sluice_node_state",
        "1 for the node's state (open, or removed once its drive went away), 0 for the others.",
        None,
        MetricType::Gauge,
    )?;
    for n in &s.nodes {
        for (state, on) in [("open", !n.removed), ("removed", n.removed)] {
            m.encode_family(&[("node", n.name.as_str()), ("state", state)])?
                .encode_gauge(&u64::from(on))?;
        }
    }
    let mut m = encoder.encode_descriptor(
        "sluice_node_capacity_bytes",
        "Size of the node as its exports serve it.",
        None,
        MetricType::Gauge,
    )?;
    for n in &s.nodes {
        m.encode_family(&[("node", n.name.as_str())])?
            .encode_gauge(&n.capacity_bytes)?;
    }
    Ok(())
}

fn encode_jobs(encoder: &mut DescriptorEncoder, s: &MetricsSamples) -> std::fmt::Result {
    type Value = fn(&crate::api::JobStatus) -> u64;
    let gauges: [(&str, &str, Value); 2] = [
        (
            "sluice_job_done_bytes",
            "Bytes a job has done (a mirror: known to be in sync).",
            |j| j.done_bytes,
        ),
        (
            "sluice_job_total_bytes",
            "Bytes a job has to do in all.",
            |j| j.total_bytes,
        ),
    ];
    for (name, help, value) in gauges {
        let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for j in &s.jobs {
            let labels = [
                ("job", j.id.as_str()),
                ("type", j.kind.as_str()),
                ("source", j.source.as_str()),
                ("target", j.target.as_str()),
            ];
            m.encode_family(&labels)?.encode_gauge(&value(j))?;
        }
    }
    Ok(())
}

/// When this process started, in seconds since the Unix epoch: its start
/// in clock ticks after boot (`/proc/self/stat`, field 22) plus the boot
/// time (`/proc/stat` `btime`), as Prometheus' own process collectors
/// compute it; the current time if procfs cannot say.
pub(super) fn process_start_time_seconds() -> f64 {
    from_procfs().unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    })
}

fn from_procfs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let btime = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf reads a constant of the system; it touches no memory
    // of ours.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    start_time(&stat, &btime, ticks_per_second)
}

/// `process_start_time_seconds` from the texts of `/proc/self/stat` and
/// `/proc/stat`.
fn start_time(stat: &str, proc_stat: &str, ticks_per_second: i64) -> Option<f64> {
    if ticks_per_second <= 0 {
        return None;
    }
    // The command name (field 2) is in parentheses and may hold spaces:
    // fields are counted after its closing one, which is field 3's start.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let start_ticks: u64 = after_comm.split_whitespace().nth(22 - 3)?.parse().ok()?;
    let boot: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot as f64 + start_ticks as f64 / ticks_per_second as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_from_procfs_texts() {
        let stat = "4242 (sl (u) ce) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 9 0 \
                    123450 10000000 500 18446744073709551615";
        let proc_stat = "cpu  1 2 3\nbtime 1700000000\nprocesses 10\n";
        assert_eq!(
            start_time(stat, proc_stat, 100),
            Some(1_700_000_000.0 + 1234.5)
        );
        assert_eq!(start_time(stat, "cpu 1\n", 100), None);
        assert_eq!(start_time("garbage", proc_stat, 100), None);
        assert_eq!(start_time(stat, proc_stat, 0), None);
    }

    #[test]
    fn the_process_started_before_now() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = process_start_time_seconds();
        assert!(
            started <= now + 1.0 && started > now - 86_400.0 * 365.0,
            "{started} vs {now}"
        );
    }
}
