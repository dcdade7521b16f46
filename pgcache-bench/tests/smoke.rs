//! The real `pgcache-bench` binary, on tiny runs: every row or cell is measured or
//! explained, a run keeps to its duration, the YCSB chart is drawn.

use std::process::{Command, Output};
use std::time::Instant;

use serde_json::Value;

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgcache-bench"))
        .env("DATABASE_URL", database_url())
        .env("REDIS_URL", redis_url())
        .env_remove("PGCACHE_SHARDS")
        .args(args)
        .output()
        .expect("pgcache-bench runs")
}

/// Runs a bench expected to succeed; its JSON document.
fn json_of(args: &[&str]) -> Value {
    let out = bench(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every number in `value` is finite (serde_json writes NaN as null: a figure
/// that is null is the NaN of old).
fn assert_figures(row: &Value, side: &str) {
    let figures = &row[side];
    for field in ["p50_us", "p99_us", "ops_per_sec"] {
        let v = figures[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{side}.{field} of {row}"));
        assert!(v.is_finite() && v > 0.0, "{side}.{field} of {row}");
    }
    assert!(figures["samples"].as_u64().unwrap() > 0, "{row}");
}

#[test]
fn ops_measures_every_row_or_says_why_and_keeps_to_its_duration() {
    let duration = 0.1;
    let started = Instant::now();
    let json = json_of(&[
        "-q",
        "ops",
        "--json",
        "--rows",
        "200",
        "--threads",
        "2",
        "--duration",
        &duration.to_string(),
        "--redis-url",
        &redis_url(),
        "--tagged-entries",
        "1000",
    ]);
    let wall = started.elapsed().as_secs_f64();
    let rows = json["results"].as_array().unwrap();
    assert!(rows.len() > 40, "{}", rows.len());
    for row in rows {
        assert_figures(row, "pgcache");
        if !row["raw"].is_null() {
            assert_figures(row, "raw");
        }
    }
    for row in json["unmeasured"].as_array().unwrap() {
        assert!(
            row["reason"].as_str().unwrap().contains("no sample"),
            "{row}"
        );
    }
    for name in [
        "kv get hit",
        "redis GET",
        "near get 100 B (vs redis GET)",
        "kv get 5 tags / untagged",
    ] {
        assert!(
            rows.iter()
                .any(|r| r["operation"] == name && r["threads"] == 2),
            "{name} missing"
        );
    }
    // The promise of --duration: a row measures that long, its sides together; the
    // warm-up (a few dozen iterations) and set-up come on top. Generous bounds for
    // a busy machine: ten times the duration per row, and the run's own account of
    // its time matches the clock.
    let measured: f64 = rows.iter().map(|r| r["seconds"].as_f64().unwrap()).sum();
    let count = (rows.len() + json["unmeasured"].as_array().unwrap().len()) as f64;
    assert!(
        measured <= count * duration * 10.0,
        "{measured:.1} s in {count} rows of {duration} s"
    );
    let accounted = measured + json["setup_seconds"].as_f64().unwrap();
    assert!(accounted <= wall, "{accounted} > {wall}");
    assert!(
        json["wall_seconds"].as_f64().unwrap() >= accounted * 0.99,
        "{json}"
    );
}

#[test]
fn ops_on_shards_asks_which_database_to_measure() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgcache-bench"))
        .env(
            "PGCACHE_SHARDS",
            format!("a={},b=postgres://app@127.0.0.1:1/cache", database_url()),
        )
        .args(["ops"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("pgcache-bench: "), "{stderr}");
    assert!(stderr.contains("--database-url"), "{stderr}");
}

#[test]
fn ycsb_runs_each_workload_on_every_system_and_draws_the_chart() {
    let dir = std::env::temp_dir().join(format!("pgcache-ycsb-{}", std::process::id()));
    let chart = dir.join("ycsb.png");
    let json = json_of(&[
        "-q",
        "ycsb",
        "--json",
        "--records",
        "1000",
        "--workloads",
        "a,b,c,f,d",
        "--threads",
        "1,2",
        "--duration",
        "0.2",
        "--warmup",
        "0",
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 5 * 2 * 5, "{json}");
    for cell in cells {
        assert!(cell["operations"].as_u64().unwrap() > 0, "{cell}");
        assert!(cell["ops_per_sec"].as_f64().unwrap() > 0.0, "{cell}");
        let ops: Vec<&str> = cell["latencies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["operation"].as_str().unwrap())
            .collect();
        let expected: &[&str] = match cell["workload"].as_str().unwrap() {
            "A" | "B" => &["read", "update"],
            "C" => &["read"],
            "D" => &["read", "insert"],
            "F" => &["read", "rmw"],
            other => panic!("workload {other}"),
        };
        // B and D write 5 %: in a short cell of one thread there may be none.
        assert!(ops.contains(&"read"), "{cell}");
        assert!(ops.iter().all(|op| expected.contains(op)), "{cell}");
        if cell["system"] == "pgcache+near" {
            let rate = cell["near_hit_rate"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&rate), "{cell}");
        } else {
            assert!(cell["near_hit_rate"].is_null(), "{cell}");
        }
        // Every record was loaded: only D's reads of a record being inserted miss.
        if cell["workload"] != "D" {
            assert_eq!(cell["read_misses"], 0, "{cell}");
        }
    }
    let g = &json["generator"];
    let (measured, expected) = (
        g["measured_share"].as_f64().unwrap(),
        g["expected_share"].as_f64().unwrap(),
    );
    assert!((measured - expected).abs() < 0.05, "{g}");
    let png = std::fs::read(&chart).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let legend = std::fs::read_to_string(dir.join("ycsb.png.legend.txt")).unwrap();
    for system in ["pgcache+near", "pgcache", "raw-sql", "redis", "moka"] {
        assert!(legend.contains(system), "{legend}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // Nothing left behind in Redis.
    let out = Command::new("redis-cli")
        .args(["-u", &redis_url(), "--scan", "--pattern", "pgcache_ycsb_*"])
        .output();
    if let Ok(out) = out {
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "",
            "Redis keys left"
        );
    }
}

#[test]
fn refresh_measures_every_mode_in_two_processes() {
    let json = json_of(&[
        "-q",
        "refresh",
        "--json",
        "--duration",
        "1",
        "--ttl-ms",
        "200",
        "--compute-ms",
        "10",
        "--threads",
        "2",
    ]);
    let results = json["results"].as_array().unwrap();
    let modes: Vec<&str> = results
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["stale", "xfetch", "off"]);
    for result in results {
        // The first miss at least, in either process.
        assert!(result["computations"].as_u64().unwrap() >= 1, "{result}");
        assert!(result["generations"].as_u64().unwrap() >= 1, "{result}");
        for figures in ["get_or_compute", "hits"] {
            assert!(result[figures]["samples"].as_u64().unwrap() > 0, "{result}");
            assert!(result[figures]["p99_us"].as_u64().is_some(), "{result}");
        }
    }
}
