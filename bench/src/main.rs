//! `sluice-bench`: fio-like load generator on libblkio. See the library docs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use sluice_bench::parse::{parse_cpu_list, parse_duration, parse_size};
use sluice_bench::{run, Config, Driver, Rw};

/// A parsed `--cpus` list (a newtype: clap takes a bare `Vec` for repeated values).
#[derive(Clone, Debug, PartialEq)]
struct CpuList(Vec<usize>);

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DriverArg {
    /// libblkio virtio-blk-vhost-user: --path is a vhost-user-blk socket.
    VhostUser,
    /// libblkio io_uring: --path is a file or block device, opened O_DIRECT (the baseline).
    IoUring,
}

/// fio-like load generator on libblkio: vhost-user-blk sockets (sluice) or io_uring on a
/// file/block device (the baseline). Prints one human line, or one JSON object with --json.
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", version)]
struct Args {
    /// libblkio driver.
    #[arg(long, value_enum, default_value = "vhost-user")]
    driver: DriverArg,
    /// vhost-user socket (vhost-user) or file/block device (io-uring).
    #[arg(long)]
    path: PathBuf,
    /// Access pattern: read, write, randread, randwrite, rw (readwrite), randrw.
    #[arg(long, default_value = "randread", value_parser = Rw::parse)]
    rw: Rw,
    /// Reads in percent of requests for rw/randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmixread: u8,
    /// Block size (512, 4k, 64k, 1M…; binary units).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: usize,
    /// Queues, one thread and one libblkio queue each.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Measured time (10s, 500ms, 2m; a bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    runtime: Duration,
    /// Unmeasured warm-up before the measured time.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    ramp: Duration,
    /// CPUs for the queue threads (0,2-3): queue i runs on the i-th CPU of the list,
    /// round robin. Default: not pinned.
    #[arg(long, value_parser = |s: &str| parse_cpu_list(s).map(CpuList))]
    cpus: Option<CpuList>,
    /// Use only the first SIZE bytes of the device.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Give up when the backend answers no request (or the handshake) for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    io_timeout: Duration,
    /// Busy-poll for completions (libblkio poll queues; vhost-user only) instead of
    /// sleeping on the completion eventfd.
    #[arg(long)]
    poll: bool,
    /// Print one JSON object instead of the human line.
    #[arg(long)]
    json: bool,
}

/// Arguments that parse but do not make a [`Config`].
#[derive(Debug, thiserror::Error)]
enum ConfigError {
    /// A block size this machine's address space cannot hold.
    #[error("block size {0} is too large")]
    BlockSizeTooLarge(u64),
}

fn config(args: Args) -> Result<Config, ConfigError> {
    let driver = match args.driver {
        DriverArg::VhostUser => Driver::VhostUser,
        DriverArg::IoUring => Driver::IoUring,
    };
    let bs = usize::try_from(args.bs).map_err(|_| ConfigError::BlockSizeTooLarge(args.bs))?;
    Ok(Config {
        driver,
        path: args.path,
        rw: args.rw,
        rwmixread: args.rwmixread,
        bs,
        iodepth: args.iodepth,
        queues: args.queues,
        runtime: args.runtime,
        ramp: args.ramp,
        cpus: args.cpus.map(|c| c.0).unwrap_or_default(),
        size: args.size,
        io_timeout: args.io_timeout,
        poll: args.poll,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    let cfg = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                println!("{}", report.human());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_bench::parse::ParseError;
    use sluice_bench::BenchError;

    fn args(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("sluice-bench").chain(args.iter().copied()))
    }

    fn parse(args: &[&str]) -> Result<Config, Box<dyn std::error::Error>> {
        Ok(config(self::args(args)?)?)
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(&[
            "--driver",
            "vhost-user",
            "--path",
            "/run/x.sock",
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--iodepth",
            "32",
            "--queues",
            "2",
            "--runtime",
            "10s",
            "--ramp",
            "2s",
            "--cpus",
            "0",
            "--json",
        ])
        .unwrap();
        assert_eq!(c.driver, Driver::VhostUser);
        assert_eq!(c.path, PathBuf::from("/run/x.sock"));
        assert_eq!(c.rw, Rw::RandRead);
        assert_eq!(c.bs, 4096);
        assert_eq!(c.iodepth, 32);
        assert_eq!(c.queues, 2);
        assert_eq!(c.runtime, Duration::from_secs(10));
        assert_eq!(c.ramp, Duration::from_secs(2));
        assert_eq!(c.cpus, vec![0]);
    }

    #[test]
    fn defaults_and_other_forms() {
        let c = parse(&["--driver", "io-uring", "--path", "disk.img"]).unwrap();
        assert_eq!(c.driver, Driver::IoUring);
        assert_eq!(
            (c.rw, c.bs, c.iodepth, c.queues),
            (Rw::RandRead, 4096, 1, 1)
        );
        assert_eq!(c.runtime, Duration::from_secs(10));
        assert_eq!(c.ramp, Duration::ZERO);
        assert!(c.cpus.is_empty() && c.size.is_none());
        assert_eq!(c.io_timeout, Duration::from_secs(10));
        let c = parse(&[
            "--path",
            "s",
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--bs",
            "1M",
            "--cpus",
            "2-3,0",
            "--size",
            "1G",
            "--runtime",
            "500ms",
            "--io-timeout",
            "2",
        ])
        .unwrap();
        assert_eq!((c.rw, c.rwmixread, c.bs), (Rw::RandRw, 70, 1 << 20));
        assert_eq!(c.cpus, vec![2, 3, 0]);
        assert_eq!(c.size, Some(1 << 30));
        assert_eq!(c.runtime, Duration::from_millis(500));
        assert_eq!(c.io_timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse(&[]).is_err(), "--path is required");
        assert!(parse(&["--path", "s", "--rw", "trim"]).is_err());
        assert!(parse(&["--path", "s", "--bs", "4q"]).is_err());
        assert!(parse(&["--path", "s", "--rwmixread", "101"]).is_err());
        assert!(parse(&["--path", "s", "--cpus", "3-1"]).is_err());
        assert!(parse(&["--path", "s", "--runtime", "fast"]).is_err());
        assert!(parse(&["--path", "s", "--driver", "nvme"]).is_err());
    }

    /// The typed error of a value parser is clap's error's source, and its message is in
    /// clap's.
    #[test]
    fn value_errors_keep_their_type_and_message() {
        let e = args(&["--path", "s", "--bs", "4q"]).unwrap_err();
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<ParseError>());
        assert_eq!(
            source,
            Some(&ParseError::SizeSuffix {
                input: "4q".into(),
                suffix: "q".into()
            })
        );
        assert!(
            e.to_string()
                .contains(r#"size "4q": unknown suffix "q" (use k, M, G or T; binary units)"#),
            "{e}"
        );
        let e = args(&["--path", "s", "--cpus", "3-1"]).unwrap_err();
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<ParseError>());
        assert!(
            matches!(source, Some(ParseError::CpuRangeBackwards { .. })),
            "{e}"
        );
        let e = args(&["--path", "s", "--rw", "trim"]).unwrap_err();
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<BenchError>());
        assert!(
            matches!(source, Some(BenchError::UnknownPattern(p)) if p == "trim"),
            "{e}"
        );
        assert!(e.to_string().contains("unknown pattern"), "{e}");
    }
}
