//! The `edge-agent` command line as a plant engineer uses it.

use std::process::Command;

fn edge_agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
}

#[test]
fn validate_accepts_every_example_and_says_what_it_found() {
    let example = pipeline_e2e::checkout().join("config-examples/agent/line1-gateway.toml");
    let out = edge_agent().arg("validate").arg(&example).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}: ok (3 devices, 12 tags, gateway `gw-line1`)\n",
            example.display()
        )
    );
}

#[test]
fn validate_reports_every_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        r#"site = "plant"
gateway = "GW 1"

[upload.dir]
path = "out"

[[modbus]]
name = "press-3"
host = "127.0.0.1"

  [[modbus.tags]]
  name = "oil_temp"
  register = "holding"
  address = 65535
  type = "f32"
"#,
    )
    .unwrap();
    let out = edge_agent().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let file = file.display();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "{file}:2: gateway: gateway id `GW 1` is not allowed; use 1-64 characters of lowercase letters, digits, `-` and `_`, starting with a letter or digit\n\
             {file}:14: modbus[0].tags[0].address: f32 at address 65535 ends past the last register 65535; use an address of at most 65534\n"
        )
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn version_names_the_program() {
    let out = edge_agent().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("edge-agent {}\n", env!("CARGO_PKG_VERSION"))
    );
}
