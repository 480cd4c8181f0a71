//! `sluice-compare`: sluice against qemu-storage-daemon and the drive itself, side by side
//! in one run. See `sluice_bench::compare`.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice_bench::compare::{self, CompareError, Options, Placement, Point, Target};
use sluice_bench::parse::{parse_duration, parse_size};

/// Runs every point (4 KiB random read/write at depth 1/32/128 on 1 and 2 queues; 128 KiB
/// sequential read/write at depth 8) on every target (fio io_uring and libblkio io_uring on
/// the backing file; qemu-storage-daemon and sluice exporting that file and a null node over
/// vhost-user-blk) in both placements, repeated and interleaved, and writes compare.json,
/// compare.md and compare.svg.
#[derive(Debug, Parser)]
#[command(name = "sluice-compare", version)]
struct Args {
    /// Work directory: sockets, server logs, and the backing file unless --file is given.
    #[arg(long, default_value = "/var/tmp/sluice-compare")]
    dir: PathBuf,
    /// Backing file or block device instead of DIR/backing.img. Its data is overwritten
    /// by the write points.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Serve the file targets from a loop device over a FILE_SIZE file in /dev/shm (root):
    /// a steady, memory-speed drive, where a cloud VM's disk is throttled and noisy.
    #[arg(long, conflicts_with = "file")]
    ram_loop: bool,
    /// Size of DIR/backing.img (written in full once, then reused) or of the --ram-loop file.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    file_size: u64,
    /// Size of the null nodes.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    null_size: u64,
    /// Where compare.json, compare.md and compare.svg go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Measured time per run.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    runtime: Duration,
    /// Unmeasured warm-up per run.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    ramp: Duration,
    /// Runs per cell (median and range reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Targets, comma-separated (default: all): fio-io_uring, blkio-io_uring, qsd-file,
    /// sluice-file, qsd-null, sluice-null.
    #[arg(long, value_delimiter = ',', value_parser = Target::parse)]
    targets: Option<Vec<Target>>,
    /// Points, comma-separated ids such as randread-4k-qd32-q2 (default: all 14).
    #[arg(long, value_delimiter = ',')]
    points: Option<Vec<String>>,
    /// Placements, comma-separated: split (own cores), shared (one core). Default: both.
    #[arg(long, value_delimiter = ',', value_parser = Placement::parse)]
    placements: Option<Vec<Placement>>,
    /// CPU of the client (the load generator or fio).
    #[arg(long, default_value_t = 0)]
    client_cpu: usize,
    /// CPU of the server in the split placement.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// sluice's --poll-us (both placements).
    #[arg(long, default_value_t = 50)]
    sluice_poll_us: u32,
    /// sluice's --queue-depth.
    #[arg(long, default_value_t = 128)]
    sluice_queue_depth: usize,
    /// The sluice binary (default: `sluice` next to this program).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// fio binary.
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
    /// Bound on each wait for a server or a request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    io_timeout: Duration,
    /// The vhost-user client busy-polls (libblkio poll queues) instead of sleeping on its
    /// completion eventfd: the servers without the client's wake-ups. Use with
    /// --placements split (a polling client would starve a server on its own core).
    #[arg(long)]
    client_poll: bool,
    /// Run nothing: rewrite compare.md and compare.svg in --out from an earlier run's JSON.
    #[arg(long)]
    from_json: Option<PathBuf>,
}

/// Why sluice-compare has no results to write: bad options, an earlier run's JSON that does
/// not read, or a comparison that failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// A `--points` id that is not one of the standard points.
    #[error("unknown point {id:?} (one of {known})")]
    UnknownPoint {
        /// The id as given.
        id: String,
        /// The standard points' ids, comma-separated.
        known: String,
    },
    /// This program's path (to find `sluice` next to it) is unknown.
    #[error("locating this program: {0} (pass --sluice)")]
    LocateSelf(#[source] io::Error),
    /// The `--from-json` file could not be read.
    #[error("reading {}: {source}", path.display())]
    ReadJson {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The `--from-json` file is not an earlier run's compare.json.
    #[error("{}: {source}", path.display())]
    ParseJson {
        /// The file.
        path: PathBuf,
        /// Where and why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The comparison failed.
    #[error(transparent)]
    Run(CompareError),
}

fn options(a: Args) -> Result<Options, CliError> {
    let all = Point::standard();
    let points = match a.points {
        None => all,
        Some(ids) => ids
            .iter()
            .map(|id| {
                all.iter().find(|p| &p.id() == id).copied().ok_or_else(|| {
                    let known: Vec<_> = all.iter().map(|p| p.id()).collect();
                    CliError::UnknownPoint {
                        id: id.clone(),
                        known: known.join(", "),
                    }
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let sluice = match a.sluice {
        Some(p) => p,
        None => std::env::current_exe()
            .map_err(CliError::LocateSelf)?
            .with_file_name("sluice"),
    };
    Ok(Options {
        work_dir: a.dir,
        file: a.file,
        ram_loop: a.ram_loop,
        file_size_bytes: a.file_size,
        null_size_bytes: a.null_size,
        out_dir: a.out,
        runtime: a.runtime,
        ramp: a.ramp,
        repeats: a.repeats,
        targets: a.targets.unwrap_or_else(|| Target::ALL.to_vec()),
        points,
        placements: a.placements.unwrap_or_else(|| Placement::ALL.to_vec()),
        client_cpu: a.client_cpu,
        server_cpu: a.server_cpu,
        sluice_poll_us: a.sluice_poll_us,
        sluice_queue_depth: a.sluice_queue_depth,
        sluice,
        qsd: a.qsd,
        fio: a.fio,
        io_timeout: a.io_timeout,
        client_poll: a.client_poll,
    })
}

fn load(path: &PathBuf) -> Result<compare::Results, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadJson {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| CliError::ParseJson {
        path: path.clone(),
        source,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let from_json = args.from_json.clone();
    let opts = match options(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sluice-compare: {e}");
            return ExitCode::from(2);
        }
    };
    let results = match from_json
        .as_ref()
        .map_or_else(|| compare::run(&opts).map_err(CliError::Run), load)
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-compare: {e}");
            return ExitCode::FAILURE;
        }
    };
    match compare::write_results(&results, &opts.out_dir) {
        Ok(paths) => {
            for p in paths {
                eprintln!("sluice-compare: wrote {}", p.display());
            }
        }
        Err(e) => {
            eprintln!("sluice-compare: {e}");
            return ExitCode::FAILURE;
        }
    }
    print!("{}", compare::report::markdown(&results, "compare.svg"));
    let failures = results.failures();
    if failures > 0 {
        eprintln!("sluice-compare: {failures} run(s) failed (see compare.json)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options_of(args: &[&str]) -> Result<Options, CliError> {
        let args =
            Args::try_parse_from(std::iter::once("sluice-compare").chain(args.iter().copied()))
                .expect("clap accepts these");
        options(args)
    }

    #[test]
    fn points_are_picked_by_id() {
        let o = options_of(&[
            "--points",
            "read-128k-qd8-q1,randread-4k-qd1-q1",
            "--sluice",
            "s",
        ])
        .unwrap();
        let ids: Vec<_> = o.points.iter().map(|p| p.id()).collect();
        assert_eq!(
            ids,
            ["read-128k-qd8-q1", "randread-4k-qd1-q1"],
            "in the order given"
        );
        assert_eq!(o.targets, Target::ALL);
        assert_eq!(o.sluice, PathBuf::from("s"));
    }

    #[test]
    fn an_unknown_point_lists_the_known_ones() {
        let e = options_of(&["--points", "randread-3k"]).unwrap_err();
        assert!(
            matches!(&e, CliError::UnknownPoint { id, known }
                if id == "randread-3k" && known.starts_with("randread-4k-qd1-q1, ")),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with(r#"unknown point "randread-3k" (one of randread-4k-qd1-q1, "#),
            "{e}"
        );
    }

    #[test]
    fn a_json_that_does_not_load_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.json");
        let e = load(&missing).unwrap_err();
        assert!(
            matches!(&e, CliError::ReadJson { path, source }
                if path == &missing && source.kind() == io::ErrorKind::NotFound),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("reading "), "{e}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"cells\": 1}").unwrap();
        let e = load(&bad).unwrap_err();
        assert!(
            matches!(&e, CliError::ParseJson { path, .. } if path == &bad),
            "{e:?}"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert!(e.to_string().starts_with(&bad.display().to_string()), "{e}");
    }
}
