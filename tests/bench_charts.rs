//! benches/charts.sh, which benches/compare.sh runs after its table: from one run's
//! rows it draws the three SVG charts BENCHMARKS.md embeds. Checked here on rows of the
//! shape compare.sh writes, with gnuplot (installed by scripts/setup-deps).

mod common;

use std::process::Command;

use common::*;

#[test]
fn charts_are_drawn_from_a_runs_rows() {
    let dir = tempfile::tempdir().expect("tmp");
    let rows: String = [
        ("direct", 10.6, 10.8, 14.3),
        ("ssegate", 72.8, 29.6, 32.8),
        ("nginx", 13.8, 17.3, 24.9),
        ("haproxy", 4.6, 17.4, 24.7),
    ]
    .iter()
    .map(|(p, kib, cpu, p99)| {
        format!(
            "{{\"proxy\":\"{p}\",\"idle_kib_per_stream\":{kib},\"one_cpu_s_per_m\":{cpu},\"one_sys_s_per_m\":{},\"one_p99_ms\":{p99},\"shared_total_cpu_s_per_m\":14.0,\"shared_p99_ms\":115.6}}\n",
            cpu / 2.0
        )
    })
    .collect();
    let results = dir.path().join("results.jsonl");
    std::fs::write(&results, rows).expect("write");
    let out = dir.path().join("charts");
    let run = Command::new(repo().join("benches/charts.sh"))
        .arg(&results)
        .arg(&out)
        .output()
        .expect("run benches/charts.sh (gnuplot: scripts/setup-deps test installs it)");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for name in ["memory.svg", "cpu.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.join(name)).expect(name);
        assert!(
            svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
        for proxy in ["direct", "ssegate", "nginx", "haproxy"] {
            assert!(
                svg.contains(&format!(">{proxy}<")),
                "{name} has no bar for {proxy}"
            );
        }
    }
    // The charts BENCHMARKS.md embeds are in the repository.
    let doc = std::fs::read_to_string(repo().join("BENCHMARKS.md")).expect("BENCHMARKS.md");
    for name in ["memory.svg", "cpu.svg", "latency.svg"] {
        assert!(
            doc.contains(&format!("benches/charts/{name}")),
            "BENCHMARKS.md lacks {name}"
        );
        assert!(
            repo().join("benches/charts").join(name).exists(),
            "{name} not committed"
        );
    }
}
