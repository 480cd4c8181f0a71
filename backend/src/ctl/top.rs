//! `sluice ctl top`: a live view of every export's load, like `iostat -x 1`.
//!
//! A sampler thread asks the monitor for `export_counters` once per interval;
//! each row's rates are the difference of two samples over the daemon's own
//! clock, and its latency (mean and p99) comes from the difference of the
//! two samples' histograms, so it is the latency of the requests completed
//! in the interval. The screen is drawn with ratatui on crossterm; the
//! sampler is a thread of its own so that a daemon that does not answer
//! never stops `q` from working. The terminal is restored on every way out:
//! `q`, Ctrl-C, SIGTERM/SIGHUP/SIGINT, an error, a panic.
//!
//! When stdout is not a terminal, one snapshot is printed as a plain table
//! (two samples one interval apart) and the command exits.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};

use super::{CtlClient, CtlError};
use crate::api::{CountersSample, LatencyBucket, NoParams, QueueCounters};

/// Default refresh interval of `sluice ctl top`.
pub const TOP_DEFAULT_INTERVAL_MS: u64 = 1_000;
/// Shortest refresh interval accepted.
pub const TOP_MIN_INTERVAL_MS: u64 = 100;
/// Longest refresh interval accepted.
pub const TOP_MAX_INTERVAL_MS: u64 = 3_600_000;
/// Longest wait for one `export_counters` answer; a daemon slower than
/// this is reported as not answering.
pub const TOP_REPLY_TIMEOUT_MS: u64 = 10_000;
/// How often the screen loop looks for a key, a resize or a signal while
/// it waits for the next sample.
const TOP_KEY_POLL_MS: u64 = 50;

/// Why `sluice ctl top` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The daemon could not be asked (it went away, or never was there).
    #[error("{0}")]
    Ctl(#[from] CtlError),
    /// The daemon went away (or stopped answering) while top watched it.
    #[error("the daemon at {path} went away: {source}; top stopped")]
    Gone {
        /// The control socket.
        path: PathBuf,
        /// What the last request got.
        #[source]
        source: CtlError,
    },
    /// The terminal could not be set up, drawn or read.
    #[error("terminal: {0}")]
    Terminal(#[source] std::io::Error),
    /// stdout could not be written (snapshot mode).
    #[error("stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

/// The rates and latency of an export or a queue over one interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Rates {
    /// Requests completed per second.
    pub(crate) iops: f64,
    /// Reads completed per second.
    pub(crate) read_iops: f64,
    /// Writes completed per second.
    pub(crate) write_iops: f64,
    /// Bytes read per second.
    pub(crate) read_bytes_per_s: f64,
    /// Bytes written per second.
    pub(crate) write_bytes_per_s: f64,
    /// Mean completion latency of the interval's requests in µs (from the
    /// daemon's latency sum; from the buckets' upper bounds for a daemon
    /// that does not send it); `None` when none completed.
    pub(crate) avg_us: Option<f64>,
    /// 99th percentile of the interval's requests in µs (a bucket's upper
    /// bound; infinite beyond the last); `None` when none completed.
    pub(crate) p99_us: Option<f64>,
    /// Requests in flight at the end of the interval.
    pub(crate) in_flight: u64,
    /// Requests completed with an error per second.
    pub(crate) errors_per_s: f64,
}

/// One export's line (and its queues' lines) of the view.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ExportRow {
    pub(crate) export: String,
    pub(crate) kind: String,
    pub(crate) node: String,
    pub(crate) total: Rates,
    pub(crate) queues: Vec<(u16, Rates)>,
}

/// The latency histogram of the interval: `now`'s buckets minus `before`'s
/// (missing buckets count 0), as (upper bound in ns, count), increasing.
fn histogram_delta(before: &[LatencyBucket], now: &[LatencyBucket]) -> Vec<(Option<u64>, u64)> {
    // `None` (no bound) sorts after every bound.
    let key = |b: &LatencyBucket| (b.upper_ns.is_none(), b.upper_ns.unwrap_or(0));
    let mut sum: BTreeMap<(bool, u64), (Option<u64>, u64)> = BTreeMap::new();
    for b in now {
        let e = sum.entry(key(b)).or_insert((b.upper_ns, 0));
        e.1 += b.count;
    }
    for b in before {
        if let Some(e) = sum.get_mut(&key(b)) {
            e.1 = e.1.saturating_sub(b.count);
        }
    }
    sum.into_values().filter(|(_, n)| *n > 0).collect()
}

/// Mean and p99 in µs of a histogram delta.
fn latency_of(hist: &[(Option<u64>, u64)]) -> (Option<f64>, Option<f64>) {
    let samples: u64 = hist.iter().map(|(_, n)| n).sum();
    if samples == 0 {
        return (None, None);
    }
    let us = |upper: Option<u64>| upper.map_or(f64::INFINITY, |ns| ns as f64 / 1000.0);
    let mean = hist.iter().map(|(u, n)| us(*u) * *n as f64).sum::<f64>() / samples as f64;
    let want = ((samples as f64) * 0.99).ceil().max(1.0) as u64;
    let mut seen = 0;
    let mut p99 = f64::INFINITY;
    for (u, n) in hist {
        seen += n;
        if seen >= want {
            p99 = us(*u);
            break;
        }
    }
    (Some(mean), Some(p99))
}

/// Sums queues' counters (and histograms) into one.
fn sum_queues<'a>(queues: impl IntoIterator<Item = &'a QueueCounters>) -> QueueCounters {
    let mut t = QueueCounters::default();
    let mut hist: Vec<LatencyBucket> = Vec::new();
    for q in queues {
        t.requests += q.requests;
        t.errors += q.errors;
        t.reads += q.reads;
        t.writes += q.writes;
        t.latency_sum_ns += q.latency_sum_ns;
        t.bytes_read += q.bytes_read;
        t.bytes_written += q.bytes_written;
        t.flushes += q.flushes;
        t.in_flight += q.in_flight;
        hist.extend_from_slice(&q.latency);
    }
    t.latency = histogram_delta(&[], &hist)
        .into_iter()
        .map(|(upper_ns, count)| LatencyBucket { upper_ns, count })
        .collect();
    t
}

/// The rates between two readings of one queue (or one export's sum)
/// `seconds` apart. A counter that went down (the export was removed and
/// added again under its name) counts as 0.
fn rates(before: &QueueCounters, now: &QueueCounters, seconds: f64) -> Rates {
    let per_s = |b: u64, n: u64| n.saturating_sub(b) as f64 / seconds;
    let hist = histogram_delta(&before.latency, &now.latency);
    let (estimate_us, p99_us) = latency_of(&hist);
    let samples: u64 = hist.iter().map(|(_, n)| n).sum();
    let sum_ns = now.latency_sum_ns.saturating_sub(before.latency_sum_ns);
    let avg_us = if sum_ns > 0 && samples > 0 {
        Some(sum_ns as f64 / samples as f64 / 1000.0)
    } else {
        estimate_us
    };
    Rates {
        iops: per_s(before.requests, now.requests),
        read_iops: per_s(before.reads, now.reads),
        write_iops: per_s(before.writes, now.writes),
        read_bytes_per_s: per_s(before.bytes_read, now.bytes_read),
        write_bytes_per_s: per_s(before.bytes_written, now.bytes_written),
        avg_us,
        p99_us,
        in_flight: u64::from(now.in_flight),
        errors_per_s: per_s(before.errors, now.errors),
    }
}

/// The view's rows for the interval from `before` to `now`: one per export
/// in `now`, busiest (IOPS) first, then by name. An export that `before`
/// does not have (just added) is measured from zero.
pub(crate) fn rows(before: &CountersSample, now: &CountersSample) -> Vec<ExportRow> {
    let seconds = (now.monotonic_ns.saturating_sub(before.monotonic_ns) as f64 / 1e9).max(1e-9);
    let empty = Vec::new();
    let mut rows: Vec<ExportRow> = now
        .exports
        .iter()
        .map(|x| {
            let old = before
                .exports
                .iter()
                .find(|o| o.export == x.export)
                .map_or(&empty, |o| &o.queues);
            let zero = QueueCounters::default();
            let queues = x
                .queues
                .iter()
                .map(|q| {
                    let b = old.iter().find(|o| o.queue == q.queue).unwrap_or(&zero);
                    (q.queue, rates(b, q, seconds))
                })
                .collect();
            ExportRow {
                export: x.export.clone(),
                kind: x.kind.clone(),
                node: x.node.clone(),
                total: rates(&sum_queues(old), &sum_queues(&x.queues), seconds),
                queues,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.total
            .iops
            .total_cmp(&a.total.iops)
            .then_with(|| a.export.cmp(&b.export))
    });
    rows
}

/// The columns of the view and of the snapshot table.
const HEADER: [&str; COLUMNS] = [
    "export", "type", "node", "IOPS", "r/s", "w/s", "rMB/s", "wMB/s", "avg µs", "p99 µs",
    "inflight", "err/s",
];
const COLUMNS: usize = 12;

/// A row's cells, as text.
fn cells(name: String, kind: &str, node: &str, r: &Rates) -> [String; COLUMNS] {
    let us = |v: Option<f64>| match v {
        None => "-".to_owned(),
        Some(v) if v.is_infinite() => ">69s".to_owned(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    };
    [
        name,
        kind.to_owned(),
        node.to_owned(),
        format!("{:.0}", r.iops),
        format!("{:.0}", r.read_iops),
        format!("{:.0}", r.write_iops),
        format!("{:.2}", r.read_bytes_per_s / 1e6),
        format!("{:.2}", r.write_bytes_per_s / 1e6),
        us(r.avg_us),
        us(r.p99_us),
        r.in_flight.to_string(),
        format!("{:.0}", r.errors_per_s),
    ]
}

/// Every line of the view: an export's, then (with `per_queue`) its
/// queues', named `export/qN`.
fn lines(rows: &[ExportRow], per_queue: bool) -> Vec<(bool, [String; COLUMNS])> {
    let mut out = Vec::new();
    for r in rows {
        out.push((false, cells(r.export.clone(), &r.kind, &r.node, &r.total)));
        if per_queue {
            for (q, rates) in &r.queues {
                out.push((
                    true,
                    cells(format!("{}/q{q}", r.export), "queue", &r.node, rates),
                ));
            }
        }
    }
    out
}

/// The snapshot table: a header and one line per row, columns separated
/// by at least two spaces (names and numbers never contain two), left
/// aligned.
pub(crate) fn plain_table(rows: &[ExportRow], per_queue: bool) -> String {
    let body = lines(rows, per_queue);
    let mut widths = HEADER.map(|h| h.chars().count());
    for (_, c) in &body {
        for (w, cell) in widths.iter_mut().zip(c) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |c: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(widths).enumerate() {
            s.push_str(cell);
            if i + 1 < c.len() {
                s.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(&HEADER.map(String::from));
    out.push('\n');
    for (_, c) in &body {
        out.push_str(&line(c));
        out.push('\n');
    }
    out
}

/// One `export_counters` call.
fn sample(client: &mut CtlClient) -> Result<CountersSample, CtlError> {
    let raw = client.call_with("export_counters", &NoParams {})?;
    client.read_answer("export_counters", &raw)
}

/// Connects for `top`: replies bounded by `TOP_REPLY_TIMEOUT_MS`.
fn connect(path: &Path) -> Result<CtlClient, CtlError> {
    let client = CtlClient::connect(path)?;
    client.set_reply_timeout(Duration::from_millis(TOP_REPLY_TIMEOUT_MS));
    Ok(client)
}

/// `sluice ctl top`: the live view when stdout is a terminal, else one
/// snapshot table. `per_queue`: start with the queues' rows shown.
pub fn run(path: &Path, interval: Duration, per_queue: bool) -> Result<(), TopError> {
    let mut client = connect(path)?;
    let first = sample(&mut client)?;
    if std::io::stdout().is_terminal() {
        live(path, client, first, interval, per_queue)
    } else {
        std::thread::sleep(interval);
        let second = sample(&mut client).map_err(|source| TopError::Gone {
            path: path.to_owned(),
            source,
        })?;
        let mut out = std::io::stdout().lock();
        out.write_all(plain_table(&rows(&first, &second), per_queue).as_bytes())
            .and_then(|()| out.flush())
            .map_err(TopError::Stdout)
    }
}

/// Restores the terminal when dropped: on `q`, on an error, on a panic
/// (unwinding drops it too).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
        let _ = crossterm::execute!(std::io::stdout(), crossterm::cursor::Show);
    }
}

/// What the sampler thread sends: a sample, or why it stopped.
type Sampled = Result<CountersSample, CtlError>;

fn live(
    path: &Path,
    client: CtlClient,
    first: CountersSample,
    interval: Duration,
    mut per_queue: bool,
) -> Result<(), TopError> {
    // SIGTERM, SIGHUP and SIGINT (raw mode makes Ctrl-C a key, but a
    // `kill -INT` still comes) end the loop, so the guard restores.
    let signalled = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
    ] {
        signal_hook::flag::register(sig, signalled.clone()).map_err(TopError::Terminal)?;
    }
    let (tx, samples) = mpsc::channel::<Sampled>();
    std::thread::Builder::new()
        .name("top-sampler".into())
        .spawn(move || sampler(client, interval, tx))
        .map_err(TopError::Terminal)?;

    let _guard = TerminalGuard;
    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let mut previous = first;
    let mut shown: Option<Vec<ExportRow>> = None;
    let mut taken = Instant::now();
    loop {
        terminal
            .draw(|f| draw(f, path, interval, shown.as_deref(), per_queue, taken))
            .map_err(TopError::Terminal)?;
        // Wait for a key, a resize, a signal or the next sample.
        loop {
            if signalled.load(Ordering::Relaxed) {
                return Ok(());
            }
            match samples.try_recv() {
                Ok(Ok(now)) => {
                    shown = Some(rows(&previous, &now));
                    previous = now;
                    taken = Instant::now();
                    break;
                }
                Ok(Err(source)) => {
                    return Err(TopError::Gone {
                        path: path.to_owned(),
                        source,
                    })
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(TopError::Gone {
                        path: path.to_owned(),
                        source: CtlError::Closed {
                            path: path.to_owned(),
                        },
                    })
                }
            }
            if !event::poll(Duration::from_millis(TOP_KEY_POLL_MS)).map_err(TopError::Terminal)? {
                continue;
            }
            match event::read().map_err(TopError::Terminal)? {
                TermEvent::Key(k) if k.kind != KeyEventKind::Release => match k.code {
                    KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(())
                    }
                    KeyCode::Char('p') | KeyCode::Char('P') => {
                        per_queue = !per_queue;
                        break;
                    }
                    _ => {}
                },
                TermEvent::Resize(..) => break,
                _ => {}
            }
        }
    }
}

/// Samples every `interval` until the screen goes (the channel closes) or
/// a call fails (sent, then the thread ends).
fn sampler(mut client: CtlClient, interval: Duration, tx: mpsc::Sender<Sampled>) {
    let mut next = Instant::now() + interval;
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += interval;
        let s = sample(&mut client);
        let failed = s.is_err();
        if tx.send(s).is_err() || failed {
            return;
        }
    }
}

fn draw(
    f: &mut ratatui::Frame<'_>,
    path: &Path,
    interval: Duration,
    rows: Option<&[ExportRow]>,
    per_queue: bool,
    taken: Instant,
) {
    let [top, bottom] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(1)]).areas(f.area());
    let title = format!(
        " sluice top: {} (every {} ms) ",
        path.display(),
        interval.as_millis()
    );
    let block = Block::bordered().title(title);
    match rows {
        None => f.render_widget(
            Paragraph::new(format!(
                "sampling: the first rates come after one interval ({} ms)",
                interval.as_millis()
            ))
            .block(block),
            top,
        ),
        Some(rows) => {
            let header = Row::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD));
            let body = lines(rows, per_queue).into_iter().map(|(queue, c)| {
                let row = Row::new(c);
                if queue {
                    row.style(Style::new().add_modifier(Modifier::DIM))
                } else {
                    row
                }
            });
            let widths = [
                Constraint::Min(12),
                Constraint::Length(10),
                Constraint::Min(8),
                Constraint::Length(9),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(6),
            ];
            let table = Table::new(body, widths).header(header).block(block);
            f.render_widget(table, top);
        }
    }
    let age = taken.elapsed().as_secs();
    let footer = format!(
        " q quit   p per-queue rows ({})   sampled {age} s ago",
        if per_queue { "on" } else { "off" }
    );
    f.render_widget(
        Line::from(footer).style(Style::new().add_modifier(Modifier::REVERSED)),
        bottom,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ExportCounters;

    fn bucket(upper_ns: Option<u64>, count: u64) -> LatencyBucket {
        LatencyBucket { upper_ns, count }
    }

    fn queue(queue: u16, requests: u64, latency: Vec<LatencyBucket>) -> QueueCounters {
        QueueCounters {
            queue,
            requests,
            errors: requests / 10,
            reads: requests / 2,
            writes: requests / 4,
            bytes_read: requests * 4096,
            bytes_written: requests * 512,
            flushes: 0,
            in_flight: 2,
            latency,
            // 0: a daemon without the sum; the mean comes from the buckets.
            latency_sum_ns: 0,
        }
    }

    #[test]
    fn the_mean_comes_from_the_latency_sum_when_the_daemon_sends_it() {
        let mut a = queue(0, 100, vec![bucket(Some(2048), 100)]);
        a.latency_sum_ns = 100 * 1_500;
        let mut b = queue(0, 300, vec![bucket(Some(2048), 300)]);
        b.latency_sum_ns = a.latency_sum_ns + 200 * 1_000;
        let r = rates(&a, &b, 1.0);
        assert_eq!(r.avg_us, Some(1.0), "200 requests of 1 µs each: {r:?}");
        assert_eq!(r.p99_us, Some(2.048));
    }

    fn sample(ns: u64, exports: Vec<(&str, Vec<QueueCounters>)>) -> CountersSample {
        CountersSample {
            monotonic_ns: ns,
            exports: exports
                .into_iter()
                .map(|(name, queues)| ExportCounters {
                    export: name.into(),
                    node: "n".into(),
                    kind: "vhost-user".into(),
                    queues,
                })
                .collect(),
        }
    }

    #[test]
    fn rates_and_interval_latency_come_from_differences() {
        // 2 s apart; queue 0 did 1000 requests in the interval: 990 of at
        // most 2 µs and 10 of at most 1 ms (the p99 is 2 µs: 990 ≥ 99%).
        let before = sample(
            1_000_000_000,
            vec![(
                "a",
                vec![
                    queue(0, 5000, vec![bucket(Some(2000), 5000)]),
                    queue(1, 0, vec![]),
                ],
            )],
        );
        let now = sample(
            3_000_000_000,
            vec![(
                "a",
                vec![
                    queue(
                        0,
                        6000,
                        vec![bucket(Some(2000), 5990), bucket(Some(1_000_000), 10)],
                    ),
                    queue(1, 2000, vec![bucket(Some(1_000_000), 2000)]),
                ],
            )],
        );
        let r = rows(&before, &now);
        assert_eq!(r.len(), 1);
        let q0 = &r[0].queues[0].1;
        assert_eq!(q0.iops, 500.0);
        assert_eq!((q0.read_iops, q0.write_iops), (250.0, 125.0));
        assert_eq!(q0.read_bytes_per_s, 500.0 * 4096.0);
        assert_eq!(q0.write_bytes_per_s, 500.0 * 512.0);
        assert_eq!(q0.errors_per_s, 50.0);
        assert_eq!(q0.p99_us, Some(2.0));
        let mean = (990.0 * 2.0 + 10.0 * 1000.0) / 1000.0;
        assert!((q0.avg_us.unwrap() - mean).abs() < 1e-9, "{q0:?}");
        // The export: 3000 requests in 2 s, 2010 of them at 1 ms.
        let t = &r[0].total;
        assert_eq!(t.iops, 1500.0);
        assert_eq!(t.p99_us, Some(1000.0));
        assert_eq!(t.in_flight, 4);
    }

    #[test]
    fn rows_are_sorted_by_load_and_new_exports_count_from_zero() {
        let before = sample(0, vec![("idle", vec![queue(0, 7, vec![])])]);
        let now = sample(
            1_000_000_000,
            vec![
                ("idle", vec![queue(0, 7, vec![])]),
                ("busy", vec![queue(0, 100, vec![bucket(None, 100)])]),
            ],
        );
        let r = rows(&before, &now);
        let names: Vec<&str> = r.iter().map(|r| r.export.as_str()).collect();
        assert_eq!(names, ["busy", "idle"]);
        assert_eq!(r[0].total.iops, 100.0);
        assert_eq!(r[0].total.p99_us, Some(f64::INFINITY));
        assert_eq!(r[1].total.iops, 0.0);
        assert_eq!(r[1].total.avg_us, None);
    }

    #[test]
    fn the_snapshot_table_parses_back() {
        let before = sample(0, vec![("vm0", vec![queue(0, 0, vec![])])]);
        let now = sample(
            1_000_000_000,
            vec![("vm0", vec![queue(0, 250, vec![bucket(Some(9000), 250)])])],
        );
        let text = plain_table(&rows(&before, &now), true);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert_eq!(lines[0], HEADER);
        assert_eq!(
            lines[1],
            [
                "vm0",
                "vhost-user",
                "n",
                "250",
                "125",
                "62",
                "1.02",
                "0.13",
                "9.0",
                "9.0",
                "2",
                "25"
            ]
        );
        assert_eq!(
            lines[2],
            ["vm0/q0", "queue", "n", "250", "125", "62", "1.02", "0.13", "9.0", "9.0", "2", "25"]
        );
        assert_eq!(lines.len(), 3);
    }
}
