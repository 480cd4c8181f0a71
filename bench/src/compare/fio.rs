//! The physical limit: fio's io_uring engine, `direct=1`, on the backing file itself.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::{Options, Point, Sample};

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
pub fn run(opts: &Options, point: &Point, file: &Path, file_size: u64) -> Result<Sample, String> {
    let out = Command::new(&opts.fio)
        .args(args(opts, point, file, file_size))
        .output()
        .map_err(|e| format!("running {}: {e}", opts.fio.display()))?;
    if !out.status.success() {
        return Err(format!(
            "fio exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Reads the one (group-reported) job of fio's `--output-format=json` report.
pub fn parse(text: &str) -> Result<Sample, String> {
    // fio may print notes before the JSON object.
    let start = text.find('{').ok_or("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&text[start..]).map_err(|e| format!("fio's JSON: {e}"))?;
    let job = &v["jobs"][0];
    if job.is_null() {
        return Err("fio's JSON has no job".into());
    }
    let dir = |d: &str| -> Result<(f64, f64, f64, &Value), String> {
        let o = &job[d];
        let num = |k: &str| o[k].as_f64().ok_or(format!("fio's JSON lacks {d}.{k}"));
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
        return Err("fio completed no I/O".into());
    }
    let mean = |l: &Value| l["mean"].as_f64().unwrap_or(0.0);
    let lat_mean = (mean(r_lat) * r_ios + mean(w_lat) * w_ios) / ios;
    // Percentiles of the direction with more I/O (the points are pure reads or writes).
    let lat = if r_ios >= w_ios { r_lat } else { w_lat };
    let pct = |p: &str| -> Result<f64, String> {
        lat["percentile"][p]
            .as_f64()
            .ok_or(format!("fio's JSON lacks lat_ns percentile {p}"))
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
        assert!(parse("{\"jobs\":[]}").is_err());
        assert!(parse("fio: error").is_err());
    }
}
