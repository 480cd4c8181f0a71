//! The physical limit: fio's io_uring engine, `direct=1`, on the backing file itself.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use serde_json::Value;

use super::{Options, Point, Sample};

/// Why a fio run gave no sample: fio could not be run, failed, or its JSON report lacks
/// what a sample needs.
#[derive(Debug, thiserror::Error)]
pub enum FioError {
    /// The fio program could not be run.
    #[error("running {}: {source}", program.display())]
    Spawn {
        /// The fio program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// fio exited with a failure.
    #[error("fio exited with {status}: {stderr}")]
    Exit {
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// fio printed no JSON object.
    #[error("no JSON in fio's output")]
    NoJson,
    /// fio's JSON report does not parse.
    #[error("fio's JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// fio's JSON report has no job.
    #[error("fio's JSON has no job")]
    NoJob,
    /// The job lacks a number a sample needs.
    #[error("fio's JSON lacks {field}")]
    Missing {
        /// The field, e.g. `read.iops`.
        field: String,
    },
    /// The job lacks a latency percentile.
    #[error("fio's JSON lacks lat_ns percentile {0}")]
    MissingPercentile(&'static str),
    /// The job completed no request.
    #[error("fio completed no I/O")]
    NoIo,
}

/// fio's arguments for `point` on `file`.
pub fn args(opts: &Options, point: &Point, file: &Path, file_size: u64) -> Vec<String> {
    let mut a = vec![
        "--name=compare".to_owned(),
        format!("--filename={}", file.display()),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--rw={}", point.rw.name()),
        format!("--bs={}", point.bs),
        format!("--iodepth={}", point.iodepth),
        format!("--numjobs={}", point.queues),
        "--thread".into(),
        "--group_reporting".into(),
        "--time_based".into(),
        format!("--runtime={}ms", opts.runtime.as_millis().max(1)),
        format!("--ramp_time={}ms", opts.ramp.as_millis()),
        format!("--cpus_allowed={}", opts.client_cpu),
        // Like the generator: uniform random offsets, total latency percentiles.
        "--norandommap".into(),
        "--randrepeat=0".into(),
        "--lat_percentiles=1".into(),
        "--output-format=json".into(),
    ];
    if point.rw.random() {
        a.push(format!("--size={file_size}"));
    } else {
        // Sequential jobs each get their own stretch, as the generator's queues do.
        let per = (file_size / point.queues as u64) / point.bs as u64 * point.bs as u64;
        a.push(format!("--size={per}"));
        a.push(format!("--offset_increment={per}"));
    }
    a
}

/// Runs fio once and reads its JSON report.
pub fn run(opts: &Options, point: &Point, file: &Path, file_size: u64) -> Result<Sample, FioError> {
    let out = Command::new(&opts.fio)
        .args(args(opts, point, file, file_size))
        .output()
        .map_err(|source| FioError::Spawn {
            program: opts.fio.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(FioError::Exit {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Reads the one (group-reported) job of fio's `--output-format=json` report.
pub fn parse(text: &str) -> Result<Sample, FioError> {
    // fio may print notes before the JSON object.
    let start = text.find('{').ok_or(FioError::NoJson)?;
    let v: Value = serde_json::from_str(&text[start..]).map_err(FioError::Json)?;
    let job = &v["jobs"][0];
    if job.is_null() {
        return Err(FioError::NoJob);
    }
    let dir = |d: &str| -> Result<(f64, f64, f64, &Value), FioError> {
        let o = &job[d];
        let num = |k: &str| {
            o[k].as_f64().ok_or_else(|| FioError::Missing {
                field: format!("{d}.{k}"),
            })
        };
        Ok((
            num("iops")?,
            num("bw_bytes")?,
            num("total_ios")?,
            &o["lat_ns"],
        ))
    };
    let (r_iops, r_bw, r_ios, r_lat) = dir("read")?;
    let (w_iops, w_bw, w_ios, w_lat) = dir("write")?;
    let ios = r_ios + w_ios;
    if ios == 0.0 {
        return Err(FioError::NoIo);
    }
    let mean = |l: &Value| l["mean"].as_f64().unwrap_or(0.0);
    let lat_mean = (mean(r_lat) * r_ios + mean(w_lat) * w_ios) / ios;
    // Percentiles of the direction with more I/O (the points are pure reads or writes).
    let lat = if r_ios >= w_ios { r_lat } else { w_lat };
    let pct = |p: &'static str| -> Result<f64, FioError> {
        lat["percentile"][p]
            .as_f64()
            .ok_or(FioError::MissingPercentile(p))
    };
    let cpu = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    Ok(Sample {
        iops: r_iops + w_iops,
        bw_bytes_per_s: r_bw + w_bw,
        lat_mean_ns: lat_mean,
        lat_p50_ns: pct("50.000000")?,
        lat_p99_ns: pct("99.000000")?,
        lat_p99_9_ns: pct("99.900000")?,
        client_cpu_percent: cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_group_report() {
        let text = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version":"fio-3.33","jobs":[{"jobname":"compare","usr_cpu":10.5,"sys_cpu":20.0,
 "read":{"iops":1000.0,"bw_bytes":4096000,"total_ios":2000,
   "lat_ns":{"mean":900.0,"percentile":{"50.000000":800,"99.000000":2000,"99.900000":3000}}},
 "write":{"iops":0.0,"bw_bytes":0,"total_ios":0,"lat_ns":{"mean":0.0}}}]}"#;
        let s = parse(text).unwrap();
        assert_eq!(s.iops, 1000.0);
        assert_eq!(s.lat_mean_ns, 900.0);
        assert_eq!(
            (s.lat_p50_ns, s.lat_p99_ns, s.lat_p99_9_ns),
            (800.0, 2000.0, 3000.0)
        );
        assert_eq!(s.client_cpu_percent, 30.5);
    }

    #[test]
    fn reports_that_lack_something_are_typed_errors() {
        assert!(matches!(parse("fio: error"), Err(FioError::NoJson)));
        assert!(matches!(parse("{\"jobs\":[]}"), Err(FioError::NoJob)));
        let e = parse("note\n{\"jobs\":[").unwrap_err();
        assert!(matches!(e, FioError::Json(_)), "{e:?}");
        assert!(e.to_string().starts_with("fio's JSON: "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let e = parse(r#"{"jobs":[{"read":{"iops":1.0}}]}"#).unwrap_err();
        assert!(
            matches!(&e, FioError::Missing { field } if field == "read.bw_bytes"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "fio's JSON lacks read.bw_bytes");
        let dir =
            |ios: u32| format!(r#"{{"iops":1.0,"bw_bytes":1,"total_ios":{ios},"lat_ns":{{}}}}"#);
        let e = parse(&format!(
            r#"{{"jobs":[{{"read":{},"write":{}}}]}}"#,
            dir(0),
            dir(0)
        ))
        .unwrap_err();
        assert!(matches!(e, FioError::NoIo), "{e:?}");
        let e = parse(&format!(
            r#"{{"jobs":[{{"read":{},"write":{}}}]}}"#,
            dir(5),
            dir(0)
        ))
        .unwrap_err();
        assert!(
            matches!(e, FioError::MissingPercentile("50.000000")),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "fio's JSON lacks lat_ns percentile 50.000000"
        );
    }
}
