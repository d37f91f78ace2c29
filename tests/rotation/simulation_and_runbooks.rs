//! The simulation and the runbooks' commands.

use super::*;

#[test]
fn the_simulation_sees_no_failure_in_a_correct_rotation_and_the_outage_of_an_early_retire() {
    for kind in ["root", "environment", "cluster"] {
        let o = Command::new(ca_cli_bin())
            .args(["--output", "json", "rotation", "simulate", "--kind", kind, "--clusters", "2", "--workloads", "2"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{kind}: {}", stderr(&o));
        let steps: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
        assert!(steps.len() >= 6, "{kind}: {steps:?}");
        for s in &steps {
            assert_eq!(s["handshakes"], json!(4 * 3 * 2), "{kind}: {s}");
            assert!(s["failures"].as_array().unwrap().is_empty(), "{kind}: {s}");
        }
    }
    let o = Command::new(ca_cli_bin())
        .args([
            "--output",
            "json",
            "rotation",
            "simulate",
            "--kind",
            "root",
            "--clusters",
            "2",
            "--workloads",
            "2",
            "--retire-early",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("handshakes failed during the simulated root rotation"), "{}", stderr(&o));
    let steps: Vec<Value> = serde_json::from_str(&stdout(&o)).unwrap();
    for s in &steps {
        let failed = !s["failures"].as_array().unwrap().is_empty();
        // Only once the old root is gone, and on both stacks.
        assert_eq!(failed, s["stage"] == "retire" && s["step"] != "all workloads renewed", "{s}");
        if failed {
            let stacks: std::collections::BTreeSet<&str> =
                s["failures"].as_array().unwrap().iter().map(|f| f["stack"].as_str().unwrap()).collect();
            assert_eq!(stacks.len(), 2, "{s}");
        }
    }
}

/// Every `ca-cli` command in the runbooks exists with the flags it is given, and every stage
/// named with `--to` is a stage.
#[test]
fn the_runbooks_use_commands_that_exist() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runbooks");
    let stages = ["prepared", "distribute", "reissue", "drain", "retire", "done", "aborted"];
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut in_code = false;
        for line in text.lines() {
            if line.trim_start().starts_with("```") {
                in_code = !in_code;
                continue;
            }
            if !in_code {
                continue;
            }
            for cmd in line.split("&&") {
                let cmd = cmd.split(" #").next().unwrap().trim();
                let Some(rest) = cmd.strip_prefix("ca-cli ") else { continue };
                let tokens: Vec<&str> = rest.split_whitespace().collect();
                let sub: Vec<&str> = tokens
                    .iter()
                    .take_while(|t| {
                        t.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                            && t.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    })
                    .copied()
                    .collect();
                let o = Command::new(ca_cli_bin()).args(&sub).arg("--help").output().unwrap();
                assert!(o.status.success(), "{}: `{cmd}`: {}", path.display(), stderr(&o));
                let help = stdout(&o);
                for (i, flag) in tokens.iter().enumerate().filter(|(_, t)| t.starts_with("--")) {
                    assert!(
                        help.contains(&format!("{flag} "))
                            || help.contains(&format!("{flag}\n"))
                            || help.contains(&format!("{flag} <")),
                        "{}: `{cmd}`: {flag} is not a flag of `ca-cli {}`",
                        path.display(),
                        sub.join(" ")
                    );
                    if *flag == "--to" {
                        assert!(
                            stages.contains(&tokens[i + 1]),
                            "{}: `{cmd}`: no stage {}",
                            path.display(),
                            tokens[i + 1]
                        );
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 25, "only {checked} commands found");
}
