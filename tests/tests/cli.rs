//! The daemon's command line and config file: a config with two exports serves both, and
//! bad arguments stop it with one clear line on stderr and nothing left behind.

use std::path::Path;

use sluice_tests::{
    assert_gone, make_file, path_str, pattern, run_to_exit, Client, Daemon, Finished, RawClient,
    EXIT_TIMEOUT, MIB, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_OK,
};

/// Test 8: `serve --config` with a file disk and a null disk, one export each; both print
/// a ready line and both serve (the file export with its serial).
#[test]
fn config_file_with_two_exports_serves_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("d0.img");
    make_file(&file, 64 * MIB);
    let sock0 = dir.path().join("vm0.sock");
    let sock1 = dir.path().join("vm1.sock");
    let config = dir.path().join("sluice.toml");
    let toml = format!(
        r#"[[disk]]
name = "d0"
path = "{file}"

[[disk]]
name = "d1"
path = "null:32M"

[[export]]
name = "vm0"
disk = "d0"
type = "vhost-user"
socket = "{sock0}"
queues = 2
queue_depth = 16
read_only = false
serial = "vm0-disk"

[[export]]
name = "vm1"
disk = "d1"
type = "vhost-user"
socket = "{sock1}"
queues = 1
queue_depth = 8
"#,
        file = path_str(&file),
        sock0 = path_str(&sock0),
        sock1 = path_str(&sock1),
    );
    std::fs::write(&config, toml).expect("write config");

    let mut daemon = Daemon::spawn(&["serve", "--config", path_str(&config)], 2);
    let find = |name: &str| {
        daemon
            .ready
            .iter()
            .find(|e| e["export"] == name)
            .unwrap_or_else(|| panic!("no ready event for {name}: {:?}", daemon.ready))
            .clone()
    };
    let e0 = find("vm0");
    assert_eq!(e0["socket"], path_str(&sock0), "{e0}");
    assert_eq!(e0["type"], "vhost-user", "{e0}");
    assert_eq!(e0["capacity_bytes"], 64 * MIB, "{e0}");
    assert_eq!(e0["queues"], 2, "{e0}");
    assert_eq!(e0["queue_depth"], 16, "{e0}");
    assert_eq!(e0["read_only"], false, "{e0}");
    let e1 = find("vm1");
    assert_eq!(e1["socket"], path_str(&sock1), "{e1}");
    assert_eq!(e1["capacity_bytes"], 32 * MIB, "{e1}");
    assert_eq!(e1["queues"], 1, "{e1}");
    assert_eq!(e1["queue_depth"], 8, "{e1}");

    // Both at once: one client on each export.
    let mut c0 = Client::connect(&sock0, 2, 16).unwrap_or_else(|e| panic!("vm0: {e}"));
    let mut c1 = Client::connect(&sock1, 1, 8).unwrap_or_else(|e| panic!("vm1: {e}"));
    assert_eq!(c0.capacity, 64 * MIB);
    assert_eq!(c1.capacity, 32 * MIB);
    let off = 5 * MIB;
    let data = pattern(off, 64 * 1024, 0xC0F);
    assert_eq!(c0.write(off, &data), 0, "write on vm0");
    assert_eq!(c0.flush(), 0, "flush on vm0");
    let got1 = c1.read(off, 64 * 1024).expect("read on vm1");
    assert!(got1.iter().all(|&b| b == 0), "null export returned data");
    assert_eq!(c0.read(off, 64 * 1024).expect("read on vm0"), data);
    drop(c0);
    drop(c1);

    let mut raw = RawClient::connect(&sock0).unwrap_or_else(|e| panic!("{e}"));
    let (status, id) = raw.get_id().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, VIRTIO_BLK_S_OK, "GET_ID status");
    let mut want = b"vm0-disk".to_vec();
    want.resize(VIRTIO_BLK_ID_BYTES, 0);
    assert_eq!(id, want, "serial of vm0");
    drop(raw);

    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_gone(&sock0);
    assert_gone(&sock1);
    let on_disk = std::fs::read(&file).expect("read d0");
    assert_eq!(&on_disk[off as usize..off as usize + data.len()], &data[..]);
}

/// Checks a failed start: non-zero exit, exactly one non-empty line on stderr (which
/// mentions `mention` when given), no ready line on stdout, and `sock` (if given) not left
/// behind. Returns what is wrong, if anything.
fn check_clean_failure(
    what: &str,
    f: &Finished,
    mention: Option<&str>,
    sock: Option<&Path>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    if f.status.success() || f.status.code().is_none() {
        wrong.push(format!(
            "{what}: exit status {} (want a non-zero exit code)",
            f.status
        ));
    }
    let lines: Vec<&str> = f.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() != 1 {
        wrong.push(format!(
            "{what}: want one line on stderr, got {}:\n{}",
            lines.len(),
            f.stderr
        ));
    }
    if let Some(m) = mention {
        if !lines.iter().any(|l| l.contains(m)) {
            wrong.push(format!(
                "{what}: stderr does not mention {m:?}: {}",
                f.stderr
            ));
        }
    }
    if f.stdout.contains("\"ready\"") {
        wrong.push(format!("{what}: printed a ready line: {}", f.stdout));
    }
    if let Some(sock) = sock.filter(|s| s.exists()) {
        wrong.push(format!("{what}: left {} behind", sock.display()));
    }
    wrong
}

/// Test 9: bad arguments → non-zero exit, one clear line on stderr, no socket left behind.
/// All cases run; the failure lists every case that went wrong.
#[test]
fn bad_arguments_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    make_file(&file, 16 * MIB);
    let sock = dir.path().join("vm.sock");
    let missing = dir.path().join("no-such-dir").join("vm.sock");
    let file_s = path_str(&file);
    let sock_s = path_str(&sock);

    let cases: [(&str, Vec<&str>, Option<&str>, &Path); 5] = [
        (
            "--disk /nonexistent",
            vec!["serve", "--disk", "/nonexistent", "--vhost-user", sock_s],
            Some("/nonexistent"),
            &sock,
        ),
        (
            "--queues 0",
            vec![
                "serve",
                "--disk",
                file_s,
                "--vhost-user",
                sock_s,
                "--queues",
                "0",
            ],
            Some("queues"),
            &sock,
        ),
        (
            "socket in a missing directory",
            vec![
                "serve",
                "--disk",
                file_s,
                "--vhost-user",
                path_str(&missing),
            ],
            None,
            &missing,
        ),
        (
            "--disk null:banana",
            vec!["serve", "--disk", "null:banana", "--vhost-user", sock_s],
            None,
            &sock,
        ),
        (
            "--config /nonexistent.toml",
            vec!["serve", "--config", "/nonexistent.toml"],
            Some("/nonexistent.toml"),
            &sock,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, args, mention, left) in &cases {
        let f = run_to_exit(args);
        wrong.extend(check_clean_failure(what, &f, *mention, Some(left)));
    }
    if missing.parent().expect("parent").exists() {
        wrong.push("the daemon created the missing socket directory".to_owned());
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Test 9, last case: a second daemon on a socket path that another one serves fails
/// cleanly and leaves the first one's socket in place and serving.
#[test]
fn already_served_socket_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    make_file(&file, 16 * MIB);
    let other = dir.path().join("other.img");
    make_file(&other, 32 * MIB);
    let sock = dir.path().join("vm.sock");

    let mut first = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&file),
            "--vhost-user",
            path_str(&sock),
        ],
        1,
    );
    let f = run_to_exit(&[
        "serve",
        "--disk",
        path_str(&other),
        "--vhost-user",
        path_str(&sock),
    ]);
    let wrong = check_clean_failure("socket already served", &f, None, None);
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(sock.exists(), "the first daemon's socket was removed");

    let mut c = Client::connect(&sock, 1, 4)
        .unwrap_or_else(|e| panic!("first daemon no longer serves: {e}"));
    assert_eq!(c.capacity, 16 * MIB, "a client reached the wrong daemon");
    let data = pattern(0, 4096, 0xF1);
    assert_eq!(c.write(0, &data), 0);
    assert_eq!(c.read(0, 4096).expect("read"), data);
    drop(c);

    let status = first.sigterm_and_wait(EXIT_TIMEOUT);
    first.assert_exit_ok(status);
    assert_gone(&sock);
    assert_eq!(&std::fs::read(&file).expect("read")[..4096], &data[..]);
    assert!(
        std::fs::read(&other).expect("read").iter().all(|&b| b == 0),
        "the refused daemon wrote to its disk"
    );
}

/// `sluice serve --disk FILE --vhost-user SOCK --control CONTROL`, to its exit.
fn serve_with_control(file: &Path, sock: &Path, control: &Path) -> Finished {
    run_to_exit(&[
        "serve",
        "--disk",
        path_str(file),
        "--vhost-user",
        path_str(sock),
        "--control",
        path_str(control),
    ])
}

/// Issue 9 items 6 and 10: `--control PATH` never removes what is not a socket. A regular
/// file there stays as it was; a directory is named as a directory, with what to pass.
#[test]
fn control_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    make_file(&file, 16 * MIB);
    let sock = dir.path().join("vm.sock");
    let mut wrong = Vec::new();

    let precious = dir.path().join("precious.txt");
    std::fs::write(&precious, b"do not delete").expect("write");
    let f = serve_with_control(&file, &sock, &precious);
    wrong.extend(check_clean_failure(
        "--control REGULAR_FILE",
        &f,
        Some(path_str(&precious)),
        Some(&sock),
    ));
    if !f.stderr.contains("not a socket") {
        wrong.push(format!("regular file: {}", f.stderr));
    }
    match std::fs::read(&precious) {
        Ok(b) if b == b"do not delete" => {}
        other => wrong.push(format!("the regular file was changed: {other:?}")),
    }

    let adir = dir.path().join("adir");
    std::fs::create_dir(&adir).expect("mkdir");
    let f = serve_with_control(&file, &sock, &adir);
    wrong.extend(check_clean_failure(
        "--control DIR",
        &f,
        Some(path_str(&adir)),
        Some(&sock),
    ));
    if !(f.stderr.contains("is a directory, not a socket") && f.stderr.contains("--control"))
        || f.stderr.contains("stale")
    {
        wrong.push(format!("directory: {}", f.stderr));
    }
    if !adir.is_dir() {
        wrong.push("the directory is gone".into());
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Issue 9 item 10: directories sluice made for `--control` are removed at exit; a
/// directory that existed before stays.
#[test]
fn control_directory_made_by_sluice_is_removed_at_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    make_file(&file, 16 * MIB);
    let sock = dir.path().join("vm.sock");
    let made = dir.path().join("made");
    let control = made.join("deeper").join("control.sock");
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&file),
            "--vhost-user",
            path_str(&sock),
            "--control",
            path_str(&control),
        ],
        1,
    );
    assert!(
        control.exists(),
        "no control socket at {}",
        control.display()
    );
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_gone(&control);
    assert_gone(&made);
    assert!(dir.path().is_dir());

    // A directory that was there before (with other files) stays.
    let kept = dir.path().join("kept");
    std::fs::create_dir(&kept).expect("mkdir");
    let control = kept.join("control.sock");
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&file),
            "--vhost-user",
            path_str(&sock),
            "--control",
            path_str(&control),
        ],
        1,
    );
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
    assert_gone(&control);
    assert!(kept.is_dir(), "a directory sluice did not make was removed");
}

/// Issue 9 item 10: numeric options are parsed with their real range, and the message
/// states it.
#[test]
fn numeric_options_state_their_real_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("disk.img");
    make_file(&file, 16 * MIB);
    let sock = dir.path().join("vm.sock");
    let mut wrong = Vec::new();
    for (opt, value, range) in [
        ("--queues", "99999999999", "1..=64"),
        ("--queues", "65", "1..=64"),
        ("--queues", "0", "1..=64"),
        ("--queue-depth", "70000", "1..=1024"),
        ("--queue-depth", "1025", "1..=1024"),
        ("--poll-us", "99999999999", "0..=1000000"),
    ] {
        let f = run_to_exit(&[
            "serve",
            "--disk",
            path_str(&file),
            "--vhost-user",
            path_str(&sock),
            opt,
            value,
        ]);
        wrong.extend(check_clean_failure(
            &format!("{opt} {value}"),
            &f,
            Some(range),
            Some(&sock),
        ));
        if f.stderr.contains("65535") {
            wrong.push(format!("{opt} {value}: {}", f.stderr));
        }
    }
    // The same options of `sluice ctl export-add`, refused before anything is sent.
    let control = dir.path().join("no-daemon.sock");
    for (opt, value, range) in [
        ("--queues", "99999999999", "1..=64"),
        ("--queue-depth", "2000", "1..=1024"),
    ] {
        let f = run_to_exit(&[
            "ctl",
            "--control",
            path_str(&control),
            "export-add",
            "x",
            "--node",
            "n",
            "--vhost-user",
            path_str(&sock),
            opt,
            value,
        ]);
        if f.status.success() || !f.stderr.contains(range) || f.stderr.contains("no-daemon") {
            wrong.push(format!("ctl export-add {opt} {value}: {}", f.stderr));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Issue 9 item 10: an image whose size is not a whole number of logical blocks is served
/// without its tail, and sluice says so at start: the file, its size, the size served and
/// the bytes left out.
#[test]
fn partial_last_block_is_reported_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("odd.img");
    make_file(&file, 1_000_000);
    let sock = dir.path().join("vm.sock");
    let mut daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            path_str(&file),
            "--vhost-user",
            path_str(&sock),
        ],
        1,
    );
    let served = daemon.ready[0]["capacity_bytes"]
        .as_u64()
        .expect("capacity_bytes");
    assert!(served < 1_000_000 && 1_000_000 - served < 4096, "{served}");
    let dropped = 1_000_000 - served;
    let stderr = daemon.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains(path_str(&file)) && l.contains("1000000"))
        .unwrap_or_else(|| panic!("no line names the file and its size:\n{stderr}"));
    assert!(
        line.contains(&served.to_string()) && line.contains(&format!("{dropped} bytes")),
        "{line}"
    );
    let status = daemon.sigterm_and_wait(EXIT_TIMEOUT);
    daemon.assert_exit_ok(status);
}

/// Issue 9 item 10: two spellings of one socket path are one socket: two exports on
/// `adir/../same.sock` and `same.sock` are refused as a socket used twice, and so is a
/// control socket that is an export's socket.
#[test]
fn one_socket_spelt_two_ways_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("adir")).expect("mkdir");
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        r#"[[disk]]
name = "a"
path = "null:16M"
[[disk]]
name = "b"
path = "null:16M"
[[export]]
name = "x"
disk = "a"
type = "vhost-user"
socket = "adir/../same.sock"
[[export]]
name = "y"
disk = "b"
type = "vhost-user"
socket = "same.sock"
"#,
    )
    .expect("write config");
    let same = dir.path().join("same.sock");
    let mut wrong = Vec::new();
    let f = run_to_exit(&["serve", "--config", path_str(&config)]);
    wrong.extend(check_clean_failure(
        "two spellings of one export socket",
        &f,
        Some("used twice"),
        Some(&same),
    ));

    let f = run_to_exit(&[
        "serve",
        "--disk",
        "null:16M",
        "--vhost-user",
        path_str(&dir.path().join("adir/../s.sock")),
        "--control",
        path_str(&dir.path().join("s.sock")),
    ]);
    wrong.extend(check_clean_failure(
        "control socket = export socket",
        &f,
        Some("control socket"),
        Some(&dir.path().join("s.sock")),
    ));
    if !f.stderr.contains("export") {
        wrong.push(format!("control = export: {}", f.stderr));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Issue 9, item 10: at run time too, `export-add` refuses a second spelling of a socket
/// an export already serves, naming that export (before: a misleading "busy").
#[test]
fn runtime_export_add_refuses_another_spelling_of_a_served_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("adir")).expect("mkdir");
    let sock = dir.path().join("same.sock");
    let daemon = Daemon::spawn(
        &[
            "serve",
            "--disk",
            "null:16M",
            "--vhost-user",
            path_str(&sock),
        ],
        1,
    );
    let control = path_str(&daemon.control).to_owned();
    let other = dir.path().join("adir/../same.sock");
    let added = run_to_exit(&["ctl", "--control", &control, "node-add", "n2", "null:16M"]);
    assert_eq!(added.status.code(), Some(0), "{}", added.stderr);
    let f = run_to_exit(&[
        "ctl",
        "--control",
        &control,
        "export-add",
        "second",
        "--node",
        "n2",
        "--vhost-user",
        path_str(&other),
    ]);
    assert_ne!(
        f.status.code(),
        Some(0),
        "the second export was added: {}",
        f.stdout
    );
    assert!(
        f.stderr.contains("export same's socket"),
        "the error names the export that serves it: {}",
        f.stderr
    );
    // The first export still serves.
    let mut c = sluice_tests::Client::connect(&sock, 1, 1).expect("first export still serves");
    assert_eq!(c.write(0, &[7u8; 4096]), 0);
}
