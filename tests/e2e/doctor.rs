//! `walbridge doctor` against a real source: it names what to change, per table, and fails
//! (non-zero exit) only on what would break.

use std::process::Command;

use crate::harness::TestDb;

fn doctor(config: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_walbridge"))
        .args(["doctor", "-c"])
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_says_what_to_change_per_table() {
    let db = TestDb::new("doctor").await;
    let cfg = db.write_config();
    // The fixtures are ready: every table has a key; TOASTable columns are pointed out.
    let (ok, report) = doctor(&cfg);
    assert!(ok, "fixtures should be ready:\n{report}");
    assert!(report.contains("ok    wal_level"), "{report}");
    assert!(report.contains("table oms.products"), "{report}");
    assert!(
        report.contains("description") && report.contains("REPLICA IDENTITY FULL"),
        "TOAST columns and the fix are named:\n{report}"
    );
    assert!(
        report.contains("does not exist yet"),
        "slot and publication not created:\n{report}"
    );
    assert!(report.contains("max_slot_wal_keep_size"), "{report}");

    // A table without a key would break the legacy app's UPDATEs once published: FAIL.
    db.client
        .batch_execute("CREATE TABLE oms.audit_log (at timestamptz, line text)")
        .await
        .unwrap();
    let (ok, report) = doctor(&cfg);
    assert!(!ok, "a keyless table must fail the check:\n{report}");
    assert!(report.contains("FAIL  table oms.audit_log"), "{report}");
    assert!(
        report.contains("ALTER TABLE oms.audit_log REPLICA IDENTITY FULL"),
        "{report}"
    );
    // Doctor is read-only: nothing was created.
    let slots: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'doctor'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);

    db.client
        .batch_execute("ALTER TABLE oms.audit_log REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let (ok, report) = doctor(&cfg);
    assert!(ok, "FULL identity makes the table usable:\n{report}");
    assert!(report.contains("ok    table oms.audit_log"), "{report}");
}
