//! Scraping a daemon's `--metrics` over TCP or a UNIX socket with plain
//! HTTP/1.1 requests, reading the text exposition into samples, and
//! `promtool check metrics`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long one scrape may take before the test gives up on the server.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a daemon serves its metrics, from its `{"event":"ready","metrics":…}`
/// line: `127.0.0.1:PORT` or `unix:PATH`.
#[derive(Debug, Clone)]
pub struct Endpoint(pub String);

impl Endpoint {
    /// The metrics ready line among `ready`.
    ///
    /// # Panics
    /// When there is none.
    pub fn of(ready: &[serde_json::Value]) -> Endpoint {
        let v = ready
            .iter()
            .find_map(|r| r["metrics"].as_str())
            .unwrap_or_else(|| panic!("no metrics ready line in {ready:?}"));
        Endpoint(v.to_owned())
    }

    /// Sends `request` as it is and reads the answer until the server closes.
    pub fn exchange(&self, request: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut answer = Vec::new();
        match self.0.strip_prefix("unix:") {
            Some(path) => {
                let mut s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
                s.write_all(request)?;
                s.read_to_end(&mut answer)?;
            }
            None => {
                let mut s = TcpStream::connect(&self.0)?;
                s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
                s.write_all(request)?;
                s.read_to_end(&mut answer)?;
            }
        }
        Ok(answer)
    }

    /// `GET path`: the status code, the headers (lowercase names) and the body.
    ///
    /// # Panics
    /// When the server does not answer HTTP.
    pub fn get(&self, path: &str) -> Response {
        let request = format!("GET {path} HTTP/1.1\r\nHost: sluice\r\n\r\n");
        let raw = self
            .exchange(request.as_bytes())
            .unwrap_or_else(|e| panic!("GET {path} from {}: {e}", self.0));
        Response::parse(&raw)
    }

    /// `GET /metrics`, which must answer 200, read into samples.
    ///
    /// # Panics
    /// When it does not answer 200 with the Prometheus text format.
    pub fn scrape(&self) -> Samples {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        Samples::parse(&r.body)
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Response {
    /// Parses a whole answer.
    ///
    /// # Panics
    /// When it is not HTTP/1.1 with a status line and a blank line.
    pub fn parse(raw: &[u8]) -> Response {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of headers in {text:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
            .collect();
        Response {
            status,
            headers,
            body: body.to_owned(),
        }
    }
}

/// One sample line: name, labels, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of one scrape, and its text.
#[derive(Debug, Clone)]
pub struct Samples {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Samples {
    /// Reads the text exposition (label values without `,` `"` or `\`,
    /// as the tests' names are).
    ///
    /// # Panics
    /// On a line it cannot read.
    pub fn parse(text: &str) -> Samples {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels end with }");
                    let labels = inner
                        .split(',')
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').expect("label=value");
                            (k.to_owned(), v.trim_matches('"').to_owned())
                        })
                        .collect();
                    (name, labels)
                }
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Samples {
            text: text.to_owned(),
            samples,
        }
    }

    /// The samples of `name` whose labels include `with`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        with: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of `name` over the series whose labels include `with`.
    ///
    /// # Panics
    /// When no series matches.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        let values: Vec<f64> = self.matching(name, with).map(|s| s.value).collect();
        assert!(
            !values.is_empty(),
            "no {name} with {with:?} in:\n{}",
            self.text
        );
        values.iter().sum()
    }

    /// [`Samples::sum`] as a whole number.
    pub fn count(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        let v = self.sum(name, with);
        assert!(v >= 0.0 && v.fract() == 0.0, "{name} {with:?} = {v}");
        v as u64
    }
}

/// `promtool check metrics` on `text`: `None` when promtool is not
/// installed (tests/run.sh installs it), else its verdict with its output.
pub fn promtool_check(text: &str) -> Option<Result<(), String>> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("cannot run promtool: {e}"))),
    };
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().expect("promtool output");
    let _ = writer.join();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(if out.status.success() {
        Ok(())
    } else {
        Err(said)
    })
}

/// Whether a UNIX socket path is still there.
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
