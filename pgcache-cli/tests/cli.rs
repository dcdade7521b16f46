//! The real `pgcache` binary against a test schema.

// The library's test harness, shared rather than copied so the two cannot drift.
#[path = "../../tests/integration/common/mod.rs"]
mod common;
#[path = "../../tests/integration/ops_support/mod.rs"]
mod ops_support;

use assert_cmd::Command;
use common::TestDb;
use ops_support::{expired, fill, live};
use pgcache::Cache;
use predicates::prelude::*;

/// `pgcache` pointed at `db`'s schema through the environment, with no terminal.
fn pgcache(db: &TestDb) -> Command {
    let mut cmd = Command::cargo_bin("pgcache").unwrap();
    cmd.env("DATABASE_URL", common::database_url())
        .env("PGCACHE_SCHEMA", &db.schema)
        .env(
            "PGCACHE_POOL_CONNECTION_TIMEOUT_MS",
            common::CONNECTION_TIMEOUT.as_millis().to_string(),
        )
        .write_stdin("");
    cmd
}

/// Asserts stderr is exactly one `pgcache: ...` line and returns it.
fn one_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr).into_owned();
    assert_eq!(text.lines().count(), 1, "not one line: {text:?}");
    assert!(text.starts_with("pgcache: "), "{text:?}");
    text
}

/// Runs a command expected to fail with exit status 2; its one-line error.
fn error_line(command: &mut Command) -> String {
    let out = command.assert().code(2).get_output().clone();
    one_line(&out.stderr)
}

fn persistence(db: &TestDb) -> String {
    let n = db.count(
        "SELECT count(*) AS n FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace \
         WHERE s.nspname = current_schema() AND c.relname = 'cache_entries' \
         AND c.relpersistence = 'u'",
    );
    if n == 1 { "unlogged" } else { "logged" }.to_owned()
}

/// How many migrations the library ships: one directory each.
fn migration_count() -> usize {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .expect("the library's migrations")
        .filter(|entry| entry.as_ref().is_ok_and(|e| e.path().is_dir()))
        .count()
}

#[test]
fn migrate_creates_the_tables_and_switches_durability() {
    let db = TestDb::new();
    db.exec(&format!("DROP SCHEMA \"{}\" CASCADE", db.schema));
    pgcache(&db)
        .arg("migrate")
        .assert()
        .success()
        .stdout(predicate::str::contains(format!(
            "applied {} migrations",
            migration_count()
        )));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 0);

    pgcache(&db)
        .args(["migrate", "--unlogged"])
        .assert()
        .success()
        .stdout(predicate::str::contains("up to date").and(predicate::str::contains("UNLOGGED")));
    assert_eq!(persistence(&db), "unlogged");
    pgcache(&db)
        .args(["migrate", "--logged"])
        .assert()
        .success();
    assert_eq!(persistence(&db), "logged");
}

#[test]
fn migrate_partitions_every_cache_table_and_runs_again_safely() {
    let db = TestDb::new();
    db.cache.kv().set("kept", &serde_json::json!(1)).unwrap();
    pgcache(&db)
        .args(["migrate", "--partitions", "4"])
        .assert()
        .success()
        .stdout(predicate::str::contains(
            "cache_entries now has 4 hash partitions",
        ));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_partition_tree('cache_entries') WHERE isleaf"),
        4
    );
    assert_eq!(
        db.cache.kv().get("kept").unwrap(),
        Some(serde_json::json!(1))
    );
    let out = pgcache(&db)
        .args(["migrate", "--partitions", "4", "--json"])
        .assert()
        .success();
    let report: serde_json::Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    assert_eq!(report["partitioned"][0]["converted"], false);
    assert_eq!(report["partitioned"][0]["partitions"], 4);
    let line = error_line(pgcache(&db).args(["migrate", "--partitions", "8"]));
    assert!(line.contains("already has 4 partitions"), "{line}");
}

#[test]
fn migrate_with_an_invalid_partition_count_fails_before_touching_the_database() {
    let db = TestDb::new();
    let fresh = format!("{}_fresh", db.schema);
    for wrong in ["0", "1025"] {
        let out = pgcache(&db)
            .env("PGCACHE_SCHEMA", &fresh)
            .args(["migrate", "--partitions", wrong])
            .assert()
            .code(2)
            .get_output()
            .clone();
        let line = one_line(&out.stderr);
        assert!(
            line.contains(&format!("invalid value '{wrong}'")) && line.contains("1..=1024"),
            "{line}"
        );
    }
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM pg_namespace WHERE nspname = '{fresh}'"
        )),
        0,
        "no schema, so no tables"
    );
}

#[test]
fn missing_table_is_one_line_pointing_to_migrate() {
    let db = TestDb::new();
    db.exec("DROP TABLE cache_entries");
    for command in ["stats", "cleanup", "health"] {
        let line = error_line(pgcache(&db).arg(command));
        assert!(
            line.contains("cache_entries") && line.contains("run `pgcache migrate`"),
            "{line}"
        );
    }
    // Only `migrate` creates tables.
    assert_eq!(
        db.count("SELECT count(*) AS n FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'cache_entries'"),
        0
    );
}

#[test]
fn unreachable_database_is_one_line_without_the_password() {
    let db = TestDb::new();
    let out = pgcache(&db)
        .args([
            "--database-url",
            "postgres://postgres:s3cr3t@127.0.0.1:1/postgres",
            "stats",
        ])
        .env("PGCACHE_POOL_CONNECTION_TIMEOUT_MS", "500")
        .assert()
        .code(2)
        .stdout("")
        .get_output()
        .clone();
    let line = one_line(&out.stderr);
    assert!(line.contains("cannot get a database connection"), "{line}");
    assert!(!line.contains("s3cr3t"), "{line}");
}

#[test]
fn malformed_database_url_is_one_line() {
    let db = TestDb::new();
    // The flag the user typed, not the environment variable it overrides.
    let line = error_line(pgcache(&db).args(["--database-url", "mysql://x@y/z", "stats"]));
    assert!(line.contains("--database-url `mysql://x@y/z`"), "{line}");
}

#[test]
fn malformed_variable_in_the_environment_is_named() {
    let db = TestDb::new();
    let line = error_line(
        pgcache(&db)
            .env("PGCACHE_STATEMENT_TIMEOUT_MS", "0")
            .args(["stats"]),
    );
    assert!(line.contains("PGCACHE_STATEMENT_TIMEOUT_MS"), "{line}");
}

#[test]
fn bad_arguments_exit_non_zero() {
    let db = TestDb::new();
    pgcache(&db)
        .args(["clear", "redis"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("possible values: kv, embedding"));
    pgcache(&db)
        .args(["health", "--min-hit-rate", "high"])
        .assert()
        .code(2);
    pgcache(&db)
        .args(["migrate", "--logged", "--unlogged"])
        .assert()
        .code(2);
}

#[test]
fn cleanup_removes_expired_rows_and_stays_quiet_without_a_terminal() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "old", 7, "-1 minute");
    fill(&db, "cache_entries", "new", 3, "1 hour");
    pgcache(&db)
        .arg("cleanup")
        .assert()
        .success()
        .stderr("")
        .stdout(predicate::str::starts_with("Removed 7 expired entries"));
    assert_eq!(expired(&db, "cache_entries"), 0);
    assert_eq!(live(&db, "cache_entries"), 3);
}

#[test]
fn stats_prints_the_report_or_json() {
    let db = TestDb::new();
    fill(&db, "llm_response_cache", "llm", 2, "1 hour");
    pgcache(&db).arg("stats").assert().success().stdout(
        predicate::str::starts_with("=== Cache Statistics ===")
            .and(predicate::str::contains("(2 hits, gemini-flash)"))
            .and(predicate::str::contains("Total Cache Entries: 2"))
            .and(predicate::str::contains(
                "Connection Pool (default):\n  1 open of",
            )),
    );
    let out = pgcache(&db)
        .args(["stats", "--json"])
        .assert()
        .success()
        .get_output()
        .clone();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["total_entries"], 2);
    assert_eq!(json["top_llm_responses"][0]["hits"], 2);
    // The command's own pool: the one connection its statistics ran on.
    let pool = &json["pools"][0];
    assert_eq!(pool["shard"], "default", "{pool}");
    assert_eq!(pool["source"], "own", "{pool}");
    assert_eq!(pool["open"], 1, "{pool}");
    assert_eq!(pool["waiting"], 0, "{pool}");
}

#[test]
fn health_exits_1_with_alerts_and_0_when_healthy() {
    let db = TestDb::new();
    // Freshly migrated: no cleanup is due yet.
    pgcache(&db)
        .arg("health")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("healthy"));
    db.exec("UPDATE __diesel_schema_migrations SET run_on = run_on - interval '3 hours'");
    pgcache(&db).arg("health").assert().code(1).stdout(
        predicate::str::contains("UNHEALTHY")
            .and(predicate::str::contains("cleanup has never run")),
    );
    let out = pgcache(&db)
        .args(["health", "--json"])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["alerts"][0]["alert"], "cleanup_overdue");

    pgcache(&db).arg("cleanup").assert().success();
    pgcache(&db)
        .args(["health", "--size-budget-mb", "1024"])
        .assert()
        .success()
        .stdout(predicate::str::starts_with("healthy"));
    pgcache(&db)
        .args([
            "health",
            "--size-budget-mb",
            "1",
            "--max-size-fraction",
            "0.01",
        ])
        .assert()
        .code(1)
        .stdout(
            predicate::str::contains("ALERT cache size")
                .and(predicate::str::contains("of the 1.00 MB budget (limit 1%)")),
        );
}

#[test]
fn clear_without_yes_and_without_a_terminal_refuses() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "k", 3, "1 hour");
    let line = error_line(pgcache(&db).args(["clear", "kv"]));
    assert!(
        line.contains("--yes") && line.contains("not a terminal"),
        "{line}"
    );
    // It says what it refused to do.
    assert!(
        line.contains("all 3 entries of the kv cache") && line.contains(&db.schema),
        "{line}"
    );
    assert_eq!(live(&db, "cache_entries"), 3);

    pgcache(&db)
        .args(["clear", "kv", "--yes"])
        .assert()
        .success()
        .stdout("kv: 3 entries deleted\n");
    assert_eq!(live(&db, "cache_entries"), 0);
}

#[test]
fn clear_all_with_yes_empties_every_cache() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "k", 2, "1 hour");
    fill(&db, "audio_chunk_cache", "a", 2, "1 hour");
    pgcache(&db)
        .args(["clear", "--yes"])
        .assert()
        .success()
        .stdout(
            predicate::str::contains("kv: 2 entries deleted")
                .and(predicate::str::contains("audio_chunk: 2 entries deleted")),
        );
    assert_eq!(db.count("SELECT count(*) AS n FROM audio_chunk_cache"), 0);
}

fn warmup_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    file
}

#[test]
fn warmup_loads_a_file_and_reports_counts() {
    let db = TestDb::new();
    let file = warmup_file(
        r#"{
  "kv": [{"key": "config:v1", "value": {"theme": "dark"}}],
  "embeddings": [{"text": "What is AI?", "model": "m1", "embedding": [0.1, 0.2]}],
  "llm_responses": [{"prompt": "Explain AI", "provider": "gemini-flash", "response": "AI is..."}]
}"#,
    );
    pgcache(&db)
        .arg("warmup")
        .arg(file.path())
        .assert()
        .success()
        .stdout(predicate::str::contains("warmed 3 entries"));
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 1);
    assert_eq!(db.count("SELECT count(*) AS n FROM embedding_cache"), 1);
    assert_eq!(db.count("SELECT count(*) AS n FROM llm_response_cache"), 1);
}

#[test]
fn malformed_warmup_file_names_line_and_column_and_stores_nothing() {
    let db = TestDb::new();
    // Broken half way: the second embedding is cut off on line 4.
    let file = warmup_file(
        "{\n  \"embeddings\": [\n    {\"text\": \"a\", \"model\": \"m\", \"embedding\": [0.1]},\n    {\"text\": \"b\", \"model\": \n",
    );
    let line = error_line(pgcache(&db).arg("warmup").arg(file.path()));
    assert!(line.contains("malformed warmup file"), "{line}");
    assert!(line.contains("line 5"), "{line}");
    assert_eq!(db.count("SELECT count(*) AS n FROM embedding_cache"), 0);
}

#[test]
fn warmup_with_a_bad_item_names_it_and_stores_nothing() {
    let db = TestDb::new();
    let file = warmup_file(r#"{"kv": [{"key": "ok", "value": 1}, {"key": "", "value": 2}]}"#);
    let line = error_line(pgcache(&db).arg("warmup").arg(file.path()));
    assert!(line.contains("kv[1]"), "{line}");
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 0);
}

#[test]
fn invalidate_user_rejects_a_malformed_uuid_in_one_line() {
    let db = TestDb::new();
    let line = error_line(pgcache(&db).args(["invalidate-user", "user-123"]));
    assert!(line.contains("invalid user id `user-123`"), "{line}");
}

#[test]
fn invalidate_user_deletes_only_that_users_entries() {
    let db = TestDb::new();
    let (alice, bob) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
    let vs = db.cache.vector_search();
    for user in [alice, bob] {
        pgcache::Cache::set(
            &vs,
            &pgcache::VectorSearchQuery::new(user, vec![0.5, 0.25], 3),
            &serde_json::json!([{"id": 7}]),
        )
        .unwrap();
    }
    pgcache(&db)
        .args(["invalidate-user", &alice.to_string()])
        .assert()
        .success()
        .stdout(predicate::str::contains("1 entry deleted"));
    assert_eq!(
        db.count(&format!(
            "SELECT count(*) AS n FROM vector_search_cache WHERE user_id = '{bob}'"
        )),
        1
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM vector_search_cache"), 1);
}

#[test]
fn warmup_with_an_unknown_field_names_the_item_and_field_and_stores_nothing() {
    let db = TestDb::new();
    let file = warmup_file(
        "{\"llm_responses\": [\n  {\"prompt\": \"a\", \"provider\": \"p\", \"response\": \"r\"},\n  {\"prompt\": \"b\", \"provider\": \"p\", \"contxt\": \"c\", \"response\": \"r\"}\n]}\n",
    );
    let line = error_line(pgcache(&db).arg("warmup").arg(file.path()));
    // The position is where the item ends (serde cannot say where it began).
    assert!(
        line.contains("llm_responses[1]: unknown field `contxt`") && line.contains("at line 4"),
        "{line}"
    );
    assert_eq!(db.count("SELECT count(*) AS n FROM llm_response_cache"), 0);
}

#[test]
fn usage_errors_are_one_line_with_exit_status_2() {
    for (args, needle) in [
        (&["--bogus"][..], "unexpected argument '--bogus'"),
        (&["stats", "--jsn"], "similar argument exists: '--json'"),
        (&["health", "--min-hit-rate", "abc"], "invalid value 'abc'"),
        (&["clear", "nosuch"], "possible values: kv"),
        (
            &["migrate", "--logged", "--unlogged"],
            "cannot be used with",
        ),
        (&[], "missing command"),
    ] {
        let out = Command::cargo_bin("pgcache")
            .unwrap()
            .args(args)
            .assert()
            .code(2)
            .get_output()
            .clone();
        let line = one_line(&out.stderr);
        assert!(
            line.contains(needle) && line.contains("pgcache --help"),
            "{args:?}: {line}"
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn a_connection_string_given_as_an_argument_by_mistake_is_not_echoed() {
    let out = Command::cargo_bin("pgcache")
        .unwrap()
        .args(["stats", "postgres://app:Cl1Secret@db/app"])
        .assert()
        .code(2)
        .get_output()
        .clone();
    let line = one_line(&out.stderr);
    assert!(
        line.contains("postgres://app:***@db/app") && !line.contains("Cl1Secret"),
        "{line}"
    );
}

#[test]
fn help_and_version_still_print_normally() {
    Command::cargo_bin("pgcache")
        .unwrap()
        .arg("--help")
        .assert()
        .success()
        .stdout(
            predicate::str::contains("Usage: pgcache").and(predicate::str::contains("Commands:")),
        );
    Command::cargo_bin("pgcache")
        .unwrap()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("pgcache "));
}

#[test]
fn the_command_never_prints_the_password() {
    for url in [
        "postgres://app:Cl1Secret@no-such-host.invalid/app",
        "postgres://app:p@ss#Cl1Secret@no-such-host.invalid/app",
        "host=no-such-host.invalid user=app password='Cl1Secret x'",
        "postgres://app@no-such-host.invalid/app?password=Cl1Secret",
    ] {
        let out = Command::cargo_bin("pgcache")
            .unwrap()
            .args(["--database-url", url, "stats"])
            .env("PGCACHE_POOL_CONNECTION_TIMEOUT_MS", "500")
            .write_stdin("")
            .assert()
            .code(2)
            .get_output()
            .clone();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(output.lines().count(), 1, "{output}");
        assert!(
            !output.contains("Cl1Secret") && !output.contains("@ss"),
            "{output}"
        );
    }
}

/// `pgcache` run in `dir`, with neither `DATABASE_URL` nor `PGCACHE_SCHEMA` set.
fn pgcache_in(dir: &std::path::Path) -> Command {
    let mut cmd = Command::cargo_bin("pgcache").unwrap();
    cmd.current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("PGCACHE_SCHEMA")
        .write_stdin("");
    cmd
}

fn total_entries(out: &std::process::Output) -> serde_json::Value {
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["total_entries"].clone()
}

#[test]
fn a_dotenv_file_configures_the_command_and_the_environment_wins() {
    let (db, other) = (TestDb::new(), TestDb::new());
    fill(&db, "cache_entries", "k", 3, "1 hour");
    fill(&other, "cache_entries", "k", 1, "1 hour");
    // The file is found from a subdirectory too, like the diesel CLI finds it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "# pgcache settings\nDATABASE_URL={}\nPGCACHE_SCHEMA={}\n",
            common::database_url(),
            db.schema
        ),
    )
    .unwrap();
    let sub = dir.path().join("src");
    std::fs::create_dir(&sub).unwrap();

    let out = pgcache_in(&sub)
        .args(["stats", "--json"])
        .assert()
        .success()
        .get_output()
        .clone();
    assert_eq!(total_entries(&out), 3);

    // A variable already set is not overridden by the file.
    let out = pgcache_in(&sub)
        .env("PGCACHE_SCHEMA", &other.schema)
        .args(["stats", "--json"])
        .assert()
        .success()
        .get_output()
        .clone();
    assert_eq!(total_entries(&out), 1);

    // A malformed file is one line naming it, without echoing the line's password.
    std::fs::write(
        dir.path().join(".env"),
        "DATABASE_URL='postgres://app:Cl1Secret@db/app\n",
    )
    .unwrap();
    let out = pgcache_in(&sub)
        .arg("stats")
        .assert()
        .code(2)
        .get_output()
        .clone();
    let line = one_line(&out.stderr);
    assert!(
        line.contains("malformed .env file") && line.contains("value of DATABASE_URL"),
        "{line}"
    );
    assert!(!line.contains("Cl1Secret"), "{line}");
}

#[test]
fn completions_and_the_man_page_need_no_database() {
    // An unreachable database: neither command connects.
    let pgcache = || {
        let mut cmd = Command::cargo_bin("pgcache").unwrap();
        cmd.env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none");
        cmd
    };
    let out = pgcache()
        .args(["completions", "bash"])
        .assert()
        .success()
        .stderr("")
        .get_output()
        .clone();
    let script = String::from_utf8(out.stdout).unwrap();
    for command in [
        "migrate",
        "cleanup",
        "stats",
        "health",
        "warmup",
        "invalidate-user",
        "clear",
        "completions",
        "man",
    ] {
        assert!(script.contains(command), "{command} missing");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        pgcache()
            .args(["completions", shell])
            .assert()
            .success()
            .stdout(predicate::str::contains("pgcache"));
    }
    pgcache()
        .args(["completions", "tcsh"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("possible values: bash"));

    // roff: the title line names the command; dashes are escaped.
    pgcache().arg("man").assert().success().stderr("").stdout(
        predicate::str::contains(".TH pgcache 1")
            .and(predicate::str::contains("invalidate\\-user"))
            .and(predicate::str::contains(".env")),
    );
}

/// Runs `pgcache ARGS` against `db`, expecting `code`, and parses stdout as one JSON
/// document.
fn json_of(db: &TestDb, args: &[&str], code: i32) -> serde_json::Value {
    let out = pgcache(db)
        .args(args)
        .assert()
        .code(code)
        .stderr("")
        .get_output()
        .clone();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn every_reporting_command_prints_one_json_document() {
    let db = TestDb::new();
    db.exec(&format!("DROP SCHEMA \"{}\" CASCADE", db.schema));
    let json = json_of(&db, &["migrate", "--json"], 0);
    assert_eq!(
        json["applied"].as_array().unwrap().len(),
        migration_count(),
        "{json}"
    );
    assert_eq!(json["tables_logged"], serde_json::Value::Null);
    let json = json_of(&db, &["migrate", "--unlogged", "--json"], 0);
    assert_eq!(json["applied"], serde_json::json!([]));
    assert_eq!(json["tables_logged"], false);
    json_of(&db, &["migrate", "--logged", "--json"], 0);

    fill(&db, "cache_entries", "old", 7, "-1 minute");
    fill(&db, "cache_entries", "new", 3, "1 hour");
    let json = json_of(&db, &["cleanup", "--json"], 0);
    assert_eq!(json["rows_removed"], 7, "{json}");
    assert_eq!(json["tables"][0]["cache"], "kv");
    assert_eq!(json["tables"][0]["rows_removed"], 7);

    let file = warmup_file(
        r#"{"kv": [{"key": "w", "value": 1}],
            "llm_responses": [{"prompt": "p", "provider": "gemini-flash", "response": "r"}]}"#,
    );
    let path = file.path().to_str().unwrap();
    let json = json_of(&db, &["warmup", path, "--json"], 0);
    assert_eq!(json["total"], 2, "{json}");
    assert_eq!(json["kv"], 1);
    assert_eq!(json["llm_responses"], 1);

    let alice = uuid::Uuid::from_u128(1);
    pgcache::Cache::set(
        &db.cache.vector_search(),
        &pgcache::VectorSearchQuery::new(alice, vec![0.5], 3),
        &serde_json::json!([1]),
    )
    .unwrap();
    let json = json_of(&db, &["invalidate-user", &alice.to_string(), "--json"], 0);
    assert_eq!(json["user_id"], alice.to_string(), "{json}");
    assert_eq!(json["total"], 1);
    assert_eq!(json["vector_searches"], 1);
    assert_eq!(json["released_paths"], serde_json::json!([]));

    let json = json_of(&db, &["stats", "--json"], 0);
    assert_eq!(json["total_entries"], 5, "{json}");
    let json = json_of(&db, &["health", "--json"], 0);
    assert_eq!(json["alerts"], serde_json::json!([]), "{json}");

    let json = json_of(&db, &["clear", "kv", "--yes", "--json"], 0);
    assert_eq!(json["cleared"], true, "{json}");
    assert_eq!(json["deleted"]["kv"], 4);
    assert_eq!(json["total"], 4);
    let json = json_of(&db, &["clear", "--yes", "--json"], 0);
    assert_eq!(json["total"], 1, "{json}");
    assert_eq!(json["deleted"]["llm_response"], 1);
    assert_eq!(json["deleted"]["kv"], 0);
}

#[test]
fn quiet_prints_nothing_but_errors_and_keeps_exit_statuses() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "old", 2, "-1 minute");
    // An alert (no cleanup yet): exit status 1, nothing printed.
    db.exec("UPDATE __diesel_schema_migrations SET run_on = run_on - interval '3 hours'");
    pgcache(&db)
        .args(["-q", "health"])
        .assert()
        .code(1)
        .stdout("")
        .stderr("");
    // JSON asked for is still printed.
    let out = pgcache(&db)
        .args(["-q", "health", "--json"])
        .assert()
        .code(1)
        .get_output()
        .clone();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["alerts"][0]["alert"], "cleanup_overdue");
    for args in [
        &["--quiet", "cleanup"][..],
        &["stats", "-q"],
        &["-q", "migrate"],
        &["-q", "clear", "kv", "--yes"],
        &[
            "-q",
            "invalidate-user",
            "67e55044-10b1-426f-9247-bb680e5fe0c8",
        ],
    ] {
        pgcache(&db)
            .args(args)
            .assert()
            .success()
            .stdout("")
            .stderr("");
    }
    // Errors are still one line on stderr, with status 2.
    let out = pgcache(&db)
        .args(["-q", "clear", "kv"])
        .assert()
        .code(2)
        .stdout("")
        .get_output()
        .clone();
    assert!(one_line(&out.stderr).contains("--yes"));
    db.exec("DROP TABLE cache_entries");
    let out = pgcache(&db)
        .args(["-q", "stats"])
        .assert()
        .code(2)
        .stdout("")
        .get_output()
        .clone();
    one_line(&out.stderr);
}

/// `pgcache ARGS` on `db` with a terminal as stdin, on which `answer` is typed, and
/// `url` as `DATABASE_URL`.
#[cfg(unix)]
fn on_a_terminal(db: &TestDb, url: &str, args: &[&str], answer: &str) -> std::process::Output {
    use std::io::Write as _;
    use std::process::Stdio;
    let pty = nix::pty::openpty(None, None).unwrap();
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("pgcache"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("PGCACHE_SCHEMA", &db.schema)
        .stdin(Stdio::from(pty.slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Line-buffered by the terminal until the command reads it. The master stays
    // open until the command exits (closing it would hang the terminal up).
    let mut master = std::fs::File::from(pty.master);
    master.write_all(answer.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    drop(master);
    out
}

#[cfg(unix)]
#[test]
fn clear_names_the_database_schema_and_rows_before_asking() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "k", 3, "1 hour");
    fill(&db, "audio_chunk_cache", "a", 2, "-1 minute");
    // A password (which trust authentication ignores) that must not be shown.
    let mut url = url::Url::parse(&common::database_url()).unwrap();
    url.set_password(Some("Cl1Secret")).unwrap();
    let url = url.to_string();
    let shown = pgcache::DatabaseUrl::parse(&url).unwrap().redacted();

    let out = on_a_terminal(&db, &url, &["clear"], "n\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nothing deleted\n");
    assert_eq!(
        stderr,
        format!(
            "Delete all 5 entries of every cache (kv 3, audio_chunk 2) in schema \"{}\" of \
             {shown}? [y/N] ",
            db.schema
        )
    );
    assert!(!stderr.contains("Cl1Secret"), "{stderr}");
    assert_eq!(live(&db, "cache_entries"), 3);

    let out = on_a_terminal(&db, &url, &["clear", "kv"], "y\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.starts_with("Delete all 3 entries of the kv cache in schema")
            && stderr.contains(&db.schema)
            && !stderr.contains("Cl1Secret"),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "kv: 3 entries deleted\n"
    );
    assert_eq!(live(&db, "cache_entries"), 0);
    assert_eq!(
        db.count("SELECT count(*) AS n FROM audio_chunk_cache"),
        2,
        "only the kv cache is cleared"
    );
}

#[test]
fn a_misspelt_variable_is_warned_about_once_naming_the_right_one() {
    let db = TestDb::new();
    let out = pgcache(&db)
        .env("PGCACHE_STATMENT_TIMEOUT_MS", "60000")
        .args(["stats", "--json"])
        .assert()
        .success()
        .get_output()
        .clone();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.matches("PGCACHE_STATMENT_TIMEOUT_MS").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("did you mean PGCACHE_STATEMENT_TIMEOUT_MS?"),
        "{stderr}"
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("stdout stays JSON");
}

#[test]
fn warmup_takes_base64_audio_and_its_own_statement_timeout() {
    let db = TestDb::new();
    let file = warmup_file(
        r#"{"audio_chunks": [{"text": "Hello", "voice_model_id": "v1", "provider": "p",
            "data": {"inline": "UklGRg=="}, "format": "wav"}]}"#,
    );
    pgcache(&db)
        .arg("warmup")
        .arg(file.path())
        .args(["--statement-timeout-ms", "60000"])
        .assert()
        .success()
        .stdout(predicate::str::contains("1 audio chunk ("));
    assert_eq!(
        db.count("SELECT count(*) AS n FROM audio_chunk_cache WHERE audio_data = 'RIFF'::bytea"),
        1
    );
}

/// `pgcache` over two shards: `a`, `db`'s schema on the local server, and `b`, a
/// server that is down (nothing listens on port 1).
fn pgcache_with_a_shard_down(db: &TestDb) -> Command {
    let mut cmd = Command::cargo_bin("pgcache").unwrap();
    cmd.env(
        "PGCACHE_SHARDS",
        format!(
            "a={},b=postgres://app:Sh4rdSecret@127.0.0.1:1/cache",
            common::database_url()
        ),
    )
    .env("PGCACHE_SCHEMA", &db.schema)
    .env("PGCACHE_POOL_CONNECTION_TIMEOUT_MS", "500")
    .write_stdin("");
    cmd
}

#[test]
fn stats_and_health_name_a_shard_that_is_down_and_count_the_others() {
    let db = TestDb::new();
    fill(&db, "llm_response_cache", "llm", 2, "1 hour");
    let out = pgcache_with_a_shard_down(&db)
        .arg("stats")
        .assert()
        .success()
        .get_output()
        .clone();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Shard `b` DOWN"), "{stdout}");
    assert!(stdout.contains("Total Cache Entries: 2"), "{stdout}");
    assert!(!stdout.contains("Sh4rdSecret"), "{stdout}");
    let json = json_of_command(pgcache_with_a_shard_down(&db).args(["stats", "--json"]), 0);
    assert_eq!(json["shards_down"][0]["name"], "b");
    assert_eq!(json["total_entries"], 2);

    pgcache_with_a_shard_down(&db)
        .arg("health")
        .assert()
        .code(1)
        .stdout(predicate::str::contains("ALERT shard `b` is down"));
    let json = json_of_command(pgcache_with_a_shard_down(&db).args(["health", "--json"]), 1);
    assert_eq!(json["alerts"][0]["alert"], "shard_down");
    assert_eq!(json["alerts"][0]["shard"], "b");
}

#[test]
fn an_operation_that_must_reach_every_shard_fails_naming_the_one_that_is_down() {
    let db = TestDb::new();
    db.exec(
        "INSERT INTO cache_entries (key, value, expires_at) \
         VALUES ('old', '1', now() - interval '1 hour')",
    );
    let line = error_line(pgcache_with_a_shard_down(&db).arg("cleanup"));
    assert!(line.contains("shard `b`"), "{line}");
    assert!(!line.contains("Sh4rdSecret"), "{line}");
    // Shard `a` did its part all the same.
    assert_eq!(db.count("SELECT count(*) AS n FROM cache_entries"), 0);
}

#[test]
fn database_url_flag_and_shards_together_are_refused() {
    let db = TestDb::new();
    let line = error_line(
        pgcache_with_a_shard_down(&db)
            .args(["--database-url", &common::database_url()])
            .arg("stats"),
    );
    assert!(line.contains("PGCACHE_SHARDS"), "{line}");
}

/// The JSON document a command printed, checking its exit status.
fn json_of_command(command: &mut Command, code: i32) -> serde_json::Value {
    let out = command.assert().code(code).get_output().clone();
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cleanup_json_gives_the_elapsed_time_in_milliseconds() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "old", 2, "-1 minute");
    let json = json_of(&db, &["cleanup", "--json"], 0);
    assert!(json["elapsed_ms"].is_u64(), "{json}");
    assert!(
        json.get("elapsed").is_none(),
        "one name, with its unit: {json}"
    );
    assert!(json["tables"][0]["elapsed_ms"].is_u64(), "{json}");
}

#[test]
fn health_json_with_the_database_down_prints_the_error_as_json_and_fails() {
    let db = TestDb::new();
    let out = pgcache(&db)
        .args([
            "--database-url",
            "postgres://postgres:s3cr3t@127.0.0.1:1/postgres",
            "health",
            "--json",
        ])
        .env("PGCACHE_POOL_CONNECTION_TIMEOUT_MS", "500")
        .assert()
        .code(2)
        .get_output()
        .clone();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(json["healthy"], false, "{json}");
    let error = json["error"].as_str().expect("the error");
    assert!(
        error.contains("cannot get a database connection"),
        "{error}"
    );
    assert!(!error.contains("s3cr3t"), "{error}");
    // stderr keeps its one line for people.
    one_line(&out.stderr);
}

#[test]
fn counts_of_one_are_singular() {
    let db = TestDb::new();
    fill(&db, "cache_entries", "old", 1, "-1 minute");
    pgcache(&db)
        .arg("cleanup")
        .assert()
        .success()
        .stdout(predicate::str::starts_with("Removed 1 expired entry in"));
    db.cache.kv().set("one", &serde_json::json!(1)).unwrap();
    pgcache(&db)
        .args(["clear", "kv", "--yes"])
        .assert()
        .success()
        .stdout("kv: 1 entry deleted\n");
    let file = warmup_file(r#"{"kv": [{"key": "w", "value": 1}]}"#);
    pgcache(&db)
        .args(["warmup", file.path().to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::starts_with(
            "warmed 1 entry: 1 kv, 0 embeddings,",
        ));
}
