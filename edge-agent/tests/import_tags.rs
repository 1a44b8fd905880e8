//! `edge-agent import-tags`: golden-file tests on small Kepware and Ignition exports in
//! `tests/fixtures/`. Each `<name>.csv` has the expected stdout in `<name>.toml` and the expected
//! stderr in `<name>.stderr`; the produced TOML must load as a valid sensor map.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use edge_agent::config;

fn fixtures() -> PathBuf {
    pipeline_e2e::checkout().join("edge-agent/tests/fixtures")
}

/// Runs `import-tags` from the fixtures folder, so messages name the file as the engineer typed it.
fn import_tags(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .arg("import-tags")
        .args(args)
        .current_dir(fixtures())
        .output()
        .expect("run edge-agent")
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name)).expect("read golden file")
}

/// The tags placed under a device, as the engineer would paste them, loaded by the agent's own
/// config loader with full validation.
fn load_under_device(tags: &str) -> config::AgentConfig {
    let text = format!(
        "site = \"plant-ost\"\ngateway = \"gw-line1\"\n\n[upload.dir]\npath = \"outbox\"\n\n\
         [[modbus]]\nname = \"press-3\"\nhost = \"10.20.1.31\"\n\n{tags}"
    );
    config::load_str(&text, Path::new("imported.toml"))
        .unwrap_or_else(|e| panic!("the imported tags do not validate:\n{e}\n{text}"))
}

#[test]
fn kepware_export_converts_good_rows_reports_bad_rows_by_line_and_exits_65() {
    let out = import_tags(&["kepware_press3.csv", "--device", "press-3"]);
    let toml = String::from_utf8(out.stdout).unwrap();
    assert_eq!(toml, golden("kepware_press3.toml"));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        golden("kepware_press3.stderr")
    );
    assert_eq!(out.status.code(), Some(65));

    let cfg = load_under_device(&toml);
    let tags = &cfg.modbus[0].tags;
    let names: Vec<&str> = tags.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "OilTemp",
            "Pressure",
            "MotorCurrent",
            "Running",
            "DoorOpen",
            "Alarm.Overtemp",
            "Energy",
            "Level"
        ]
    );
    // 40103 in the export is holding 102 on the wire, scaled from 0..10000 to 0..100.
    assert_eq!(tags[1].register, config::RegisterKind::Holding);
    assert_eq!(tags[1].address, 102);
    assert_eq!(tags[1].data_type, config::DataType::U16);
    assert!((tags[1].scale - 0.01).abs() < 1e-15);
    assert_eq!(tags[5].data_type, config::DataType::Bit);
    assert_eq!(tags[5].bit, Some(3));
}

#[test]
fn ignition_export_converts_the_selected_device_and_validates() {
    let out = import_tags(&[
        "--format",
        "ignition",
        "ignition_line2.csv",
        "--device",
        "line2-plc",
    ]);
    let toml = String::from_utf8(out.stdout).unwrap();
    assert_eq!(toml, golden("ignition_line2.toml"));
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        golden("ignition_line2.stderr")
    );
    assert_eq!(out.status.code(), Some(65));
    let cfg = load_under_device(&toml);
    assert_eq!(cfg.modbus[0].tags.len(), 5);
}

#[test]
fn ignition_rows_of_several_devices_need_a_device_choice() {
    let out = import_tags(&["--format", "ignition", "ignition_line2.csv"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.lines().next(),
        Some(
            "ignition_line2.csv:7: tag `OvenTemp`: the row belongs to device `line3-plc` but earlier rows to `line2-plc`; convert one device at a time with --device line3-plc"
        )
    );
    assert_eq!(out.status.code(), Some(65));
}

#[test]
fn a_clean_export_exits_0_and_a_wrong_format_names_the_missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("clean.csv");
    std::fs::write(
        &file,
        "Tag Name;Address;Data Type;Eng. Units\nSpeed;400001;Word;rpm\n",
    )
    .unwrap();
    let out = import_tags(&[file.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "# Converted by `edge-agent import-tags` from clean.csv (Kepware CSV export).\n\
         # 1 of 1 rows converted.\n\
         # Place these tables under the [[modbus]] device they belong to.\n\
         # Kepware keeps the word order in the device settings: set byte_order on 32- and 64-bit tags if it is not ABCD.\n\
         \n\
         [[modbus.tags]]\n\
         name = \"Speed\"\n\
         register = \"holding\"\n\
         address = 0\n\
         type = \"u16\"\n\
         unit = \"rpm\"\n"
    );
    assert!(out.stderr.is_empty());
    assert_eq!(out.status.code(), Some(0));

    let out = import_tags(&["--format", "ignition", file.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!(
            "{}:1: the header has no `Name` column; --format ignition needs the columns `Name` and `OPCItemPath`; check --format and the header row\n",
            file.display()
        )
    );
    assert_eq!(out.status.code(), Some(65));

    let out = import_tags(&["missing.csv"]);
    assert_eq!(out.status.code(), Some(66));
}
