//! The amd64 Debian package built by `packaging/build-deb.sh`: what it installs, with which modes,
//! what its control data declares, that its systemd unit passes `systemd-analyze verify`, that
//! its maintainer scripts do what a first install needs, and that the binary it installs accepts
//! the sensor map it installs.
//!
//! The package is built once per test run (the first test to need it builds, the others wait) in
//! the cargo profile named by `PLANTLINE_DEB_PROFILE`, `dev` by default: the test suite has just
//! built that profile, while a warm LTO'd release build takes around four minutes on the CI
//! machines. The package layout does not depend on the profile; the shipped packages use
//! `release` (`packaging/build-deb.sh` without `--profile`), and `PLANTLINE_DEB_PROFILE=release`
//! tests exactly those.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "-1");

/// The built package, and a root it was unpacked into with `dpkg-deb -x`.
struct Package {
    deb: PathBuf,
    root: PathBuf,
}

fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let profile = std::env::var("PLANTLINE_DEB_PROFILE").unwrap_or_else(|_| "dev".into());
        let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packaging");
        let out = work.join("debs");
        let _ = fs::remove_dir_all(&work);
        let built = run(
            Command::new(pipeline_e2e::checkout().join("packaging/build-deb.sh"))
                .args(["amd64", "--profile", &profile, "--out"])
                .arg(&out),
        );
        let stdout = String::from_utf8(built.stdout).expect("build-deb.sh prints paths as UTF-8");
        let deb = PathBuf::from(
            stdout
                .lines()
                .find_map(|l| l.strip_prefix("built "))
                .unwrap_or_else(|| panic!("build-deb.sh named no package: {stdout}")),
        );
        assert_eq!(
            deb,
            out.join(format!("edge-agent_{VERSION}_amd64.deb")),
            "package file name"
        );
        let root = work.join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        run(Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(root.join("DEBIAN")));
        Package { deb, root }
    })
}

/// Runs a command and panics with its output unless it exits 0.
fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (dpkg-deb: apt-get install dpkg)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).expect("UTF-8 output")
}

#[test]
fn deb_installs_exactly_the_binary_config_unit_and_docs_with_their_modes() {
    let listing = stdout_of(
        Command::new("dpkg-deb")
            .arg("--contents")
            .arg(&package().deb),
    );
    // `drwxr-xr-x root/root 0 2025-01-01 00:00 ./usr/bin/`: mode, owner, path.
    let entries: Vec<String> = listing
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            format!("{} {} {}", f[0], f[1], f[5])
        })
        .collect();
    let expected = [
        "drwxr-xr-x root/root ./",
        "drwxr-xr-x root/root ./etc/",
        "drwxr-xr-x root/root ./etc/default/",
        "-rw------- root/root ./etc/default/edge-agent",
        "drwxr-xr-x root/root ./etc/edge-agent/",
        "-rw-r--r-- root/root ./etc/edge-agent/agent.toml",
        "drwxr-xr-x root/root ./usr/",
        "drwxr-xr-x root/root ./usr/bin/",
        "-rwxr-xr-x root/root ./usr/bin/edge-agent",
        "drwxr-xr-x root/root ./usr/lib/",
        "drwxr-xr-x root/root ./usr/lib/systemd/",
        "drwxr-xr-x root/root ./usr/lib/systemd/system/",
        "-rw-r--r-- root/root ./usr/lib/systemd/system/edge-agent.service",
        "drwxr-xr-x root/root ./usr/share/",
        "drwxr-xr-x root/root ./usr/share/doc/",
        "drwxr-xr-x root/root ./usr/share/doc/edge-agent/",
        "-rw-r--r-- root/root ./usr/share/doc/edge-agent/copyright",
    ];
    assert_eq!(entries, expected, "dpkg-deb --contents:\n{listing}");
}

#[test]
fn control_names_the_package_its_libc_and_its_conffiles() {
    let deb = &package().deb;
    let field = |name: &str| {
        stdout_of(Command::new("dpkg-deb").arg("--field").arg(deb).arg(name))
            .trim_end()
            .to_owned()
    };
    assert_eq!(field("Package"), "edge-agent");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), "amd64");
    assert_eq!(
        field("Maintainer"),
        "Plantline developers <plantline@example.invalid>"
    );
    // The glibc floor is whatever the newest symbol the build machine's glibc gave the binary;
    // it must be one Debian 12 (glibc 2.36) satisfies.
    let depends = field("Depends");
    let glibc = depends
        .strip_prefix("libc6 (>= ")
        .and_then(|rest| rest.strip_suffix("), libgcc-s1, adduser, procps"))
        .unwrap_or_else(|| panic!("Depends: {depends}"));
    let (major, minor) = glibc.split_once('.').expect("glibc version is MAJOR.MINOR");
    assert_eq!(major, "2", "Depends: {depends}");
    let minor: u32 = minor.parse().expect("glibc minor version is a number");
    assert!((17..=36).contains(&minor), "Depends: {depends}");

    let info = stdout_of(Command::new("dpkg-deb").arg("--info").arg(deb));
    let members: Vec<&str> = info
        .lines()
        .filter(|l| l.contains(" bytes, ") && l.contains(" lines"))
        // ` 1234 bytes,    30 lines   *  postinst             #!/bin/sh`
        .filter_map(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "lines")
                .find(|w| *w != "lines" && *w != "*")
        })
        .collect();
    assert_eq!(
        members,
        [
            "conffiles",
            "control",
            "md5sums",
            "postinst",
            "postrm",
            "prerm"
        ],
        "dpkg-deb --info:\n{info}"
    );
    assert_eq!(
        fs::read_to_string(package().root.join("DEBIAN/conffiles")).unwrap(),
        "/etc/default/edge-agent\n/etc/edge-agent/agent.toml\n"
    );
}

#[test]
fn installed_binary_validates_the_installed_sensor_map() {
    let root = &package().root;
    let binary = root.join("usr/bin/edge-agent");
    let config = root.join("etc/edge-agent/agent.toml");

    let version = stdout_of(Command::new(&binary).arg("--version"));
    assert_eq!(
        version,
        format!("edge-agent {}\n", env!("CARGO_PKG_VERSION"))
    );
    let validated = stdout_of(Command::new(&binary).arg("validate").arg(&config));
    assert_eq!(
        validated,
        format!(
            "{}: ok (3 devices, 12 tags, gateway `gw-line1`)\n",
            config.display()
        )
    );

    // The example map, with the buffer in the unit's StateDirectory (the only place the unit
    // may write) and nothing else changed.
    let installed = fs::read_to_string(&config).unwrap();
    let example = fs::read_to_string(
        pipeline_e2e::checkout().join("config-examples/agent/line1-gateway.toml"),
    )
    .unwrap();
    let buffer_line = "path = \"/var/lib/edge-agent/buffer.db\"";
    assert!(
        installed.lines().any(|l| l == buffer_line),
        "{buffer_line} in:\n{installed}"
    );
    let differing: Vec<(&str, &str)> = installed
        .lines()
        .zip(example.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(installed.lines().count(), example.lines().count());
    assert!(
        differing.iter().all(|(a, _)| *a == buffer_line),
        "{differing:?}"
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    // verify checks that the Exec binaries exist and that the units it is ordered against
    // load: `--root` resolves both inside a copy of the unpacked package, with this machine's
    // own system units (sysinit.target, network-online.target, ...) added.
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packaging/verify-root");
    let _ = fs::remove_dir_all(&root);
    run(Command::new("cp").arg("-a").arg(&package().root).arg(&root));
    run(Command::new("cp")
        .args(["-rn", "/usr/lib/systemd/system/."])
        .arg(root.join("usr/lib/systemd/system")));
    // ExecReload's /bin/kill comes from procps, a dependency of the package.
    fs::create_dir_all(root.join("bin")).unwrap();
    run(Command::new("cp")
        .arg("/bin/kill")
        .arg(root.join("bin/kill")));
    let unit = root.join("usr/lib/systemd/system/edge-agent.service");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(&unit)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze: {e}: apt-get install systemd (./tests/run.sh installs it)")
        });
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {stderr}");
    assert_eq!(stderr, "", "systemd-analyze verify warnings");
}

#[test]
fn systemd_unit_runs_the_agent_hardened_and_restarts_it() {
    let unit = fs::read_to_string(
        package()
            .root
            .join("usr/lib/systemd/system/edge-agent.service"),
    )
    .unwrap();
    let keys: Vec<&str> = unit
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for expected in [
        "ExecStartPre=/usr/bin/edge-agent validate /etc/edge-agent/agent.toml",
        "ExecStart=/usr/bin/edge-agent run --config /etc/edge-agent/agent.toml",
        "User=edge-agent",
        "Group=edge-agent",
        "StateDirectory=edge-agent",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "Restart=always",
        "RestartSec=5s",
        "KillSignal=SIGTERM",
        // The agent's shutdown: 5 s to stop sources plus 10 s to flush.
        "TimeoutStopSec=30s",
        // Readiness and the watchdog over sd_notify; reload is SIGHUP.
        "Type=notify",
        "WatchdogSec=60s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        // Serial ports for Modbus RTU, nothing else of /dev.
        "DevicePolicy=closed",
        "SupplementaryGroups=dialout",
        "WantedBy=multi-user.target",
    ] {
        assert!(keys.contains(&expected), "{expected} missing from:\n{unit}");
    }
}

/// First install on a machine without the user: postinst creates the system user and the state
/// directory. The commands it calls are replaced by stubs that record their arguments.
#[test]
fn postinst_creates_the_service_user_and_state_directory_on_first_install() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls");
    for (stub, exit) in [
        ("getent", 2),
        ("adduser", 0),
        ("install", 0),
        ("systemctl", 0),
    ] {
        let path = dir.path().join(stub);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{stub} $*\" >>'{}'\nexit {exit}\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", dir.path().display());
    let out = stdout_of(
        Command::new("sh")
            .arg(package().root.join("DEBIAN/postinst"))
            .args(["configure", ""])
            .env("PATH", path),
    );
    let mut expected = vec![
        "getent passwd edge-agent",
        "adduser --system --group --no-create-home --home /var/lib/edge-agent --shell /usr/sbin/nologin --gecos Plantline edge agent edge-agent",
    ];
    if !Path::new("/var/lib/edge-agent").is_dir() {
        expected.push("install -d -o edge-agent -g edge-agent -m 0750 /var/lib/edge-agent");
    }
    // Only where systemd is PID 1; test machines and containers usually run without it.
    let systemd = Path::new("/run/systemd/system").is_dir();
    if systemd {
        expected.extend([
            "systemctl daemon-reload",
            "systemctl enable edge-agent.service",
        ]);
    }
    let calls = fs::read_to_string(&log).unwrap();
    assert_eq!(calls.lines().collect::<Vec<_>>(), expected);
    assert_eq!(
        out,
        if systemd {
            "edge-agent: edit /etc/edge-agent/agent.toml (and /etc/default/edge-agent for AWS credentials), then: systemctl start edge-agent\n"
        } else {
            ""
        }
    );

    for script in ["postinst", "prerm", "postrm"] {
        run(Command::new("sh")
            .arg("-n")
            .arg(package().root.join("DEBIAN").join(script)));
    }
}
