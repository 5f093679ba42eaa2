//! Integration tests against a throwaway Postgres 15 cluster started per test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use legacy_fixtures::{InitOptions, OpKind, Profile, SimulateOptions, TABLES};
use tokio_postgres::{Client, NoTls};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A private cluster in a temp dir; stopped and removed on drop.
struct PgCluster {
    dir: PathBuf,
    port: u16,
    as_root: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

impl PgCluster {
    fn start() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "legacy-fixtures-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create cluster dir");
        let as_root = is_root();
        if as_root {
            // initdb refuses to run as root; the cluster belongs to the postgres OS user.
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&dir));
        }
        // Listening port: ask the OS for a free one (tiny race with other processes, acceptable).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let cluster = Self { dir, port, as_root };
        let data = cluster.data();
        run(cluster.pg_cmd("initdb").arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]));
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical -c fsync=off",
            port,
            cluster.dir.display()
        );
        run(cluster
            .pg_cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(cluster.dir.join("postgres.log"))
            .arg("-o")
            .arg(opts)
            .args(["-w", "start"]));
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_cmd(&self, tool: &str) -> Command {
        let bin = Path::new(PG_BIN).join(tool);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        }
    }

    async fn connect(&self, db: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname={db}",
                self.port
            ),
            NoTls,
        )
        .await
        .unwrap_or_else(|e| panic!("connect to test cluster db {db}: {e}"));
        tokio::spawn(conn);
        client
    }

    /// A fresh database in the cluster.
    async fn database(&self, name: &str) -> Client {
        let admin = self.connect("postgres").await;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("create database");
        self.connect(name).await
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .pg_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e} (is postgresql-15 installed in {PG_BIN}?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SMALL: InitOptions = InitOptions {
    seed: 7,
    products: 500,
    customers: 1000,
    locations: 5,
};

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// md5 over every row's text form, in a stable order. Covers every column, timestamps included:
/// the fixtures never write wall-clock time, so equal seeds must give equal checksums.
async fn checksum(client: &Client, table: &str) -> String {
    client
        .query_one(
            &format!(
                "select md5(coalesce(string_agg(x::text, '|' order by x::text), '')) from {table} x"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("checksum {table}: {e}"))
        .get(0)
}

async fn checksums(client: &Client) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in TABLES {
        out.push((t.to_string(), checksum(client, t).await));
    }
    out
}

/// The business invariants the simulator promises to keep.
async fn assert_stock_consistent(client: &Client) {
    assert_eq!(
        count(client, "select count(*) from wms.stock_levels where on_hand < 0 or reserved < 0 or reserved > on_hand").await,
        0,
        "stock levels out of bounds"
    );
    assert_eq!(
        count(
            client,
            "select count(*) from wms.stock_levels s
             left join (select sku, location_code, sum(qty) q from wms.stock_movements group by 1, 2) m
               using (sku, location_code)
             where coalesce(m.q, 0) <> s.on_hand"
        )
        .await,
        0,
        "movement ledger does not add up to on_hand"
    );
    assert_eq!(
        count(
            client,
            "select count(*) from wms.stock_levels s
             left join (select l.sku, l.reserved_location as location_code, sum(l.qty) q
                        from oms.order_lines l join oms.orders o on o.id = l.order_id
                        where o.status in ('pending', 'paid') group by 1, 2) r
               using (sku, location_code)
             where coalesce(r.q, 0) <> s.reserved"
        )
        .await,
        0,
        "reserved does not match open order lines"
    );
    assert_eq!(
        count(
            client,
            "select count(*) from oms.orders o
             where o.total <> (select coalesce(sum(qty * unit_price), 0) from oms.order_lines where order_id = o.id)"
        )
        .await,
        0,
        "order totals do not match their lines"
    );
}

#[tokio::test]
async fn init_loads_requested_scale_with_toasted_descriptions() {
    let pg = PgCluster::start();
    let client = pg.database("fixture").await;

    let report = legacy_fixtures::init(&client, &SMALL).await.expect("init");
    assert_eq!(report.rows("oms.products"), 500);
    assert_eq!(report.rows("oms.customers"), 1000);
    assert_eq!(report.rows("wms.locations"), 5);
    assert_eq!(report.rows("wms.stock_levels"), 2500);
    assert_eq!(report.rows("oms.inventory_cache"), 2500);
    assert_eq!(report.rows("oms.orders"), 500);
    for t in TABLES {
        let actual = count(&client, &format!("select count(*) from {t}")).await;
        assert_eq!(
            actual as u64,
            report.rows(t),
            "report disagrees with the table for {t}"
        );
        assert!(actual > 0, "{t} has no seed rows");
    }

    // Some descriptions are stored out of line, so updates can carry unchanged-TOAST markers.
    let toast: String = client
        .query_one("select reltoastrelid::regclass::text from pg_class where oid = 'oms.products'::regclass", &[])
        .await
        .expect("toast relation")
        .get(0);
    assert!(
        count(&client, &format!("select count(*) from {toast}")).await > 0,
        "no TOASTed descriptions"
    );
    assert!(
        count(
            &client,
            "select count(*) from oms.products where octet_length(description) > 8000"
        )
        .await
            > 0,
        "no long descriptions"
    );
    assert_stock_consistent(&client).await;

    // init is repeatable on the same database and gives the same data.
    let before = checksums(&client).await;
    let again = legacy_fixtures::init(&client, &SMALL)
        .await
        .expect("second init");
    assert_eq!(again.rows, report.rows);
    assert_eq!(checksums(&client).await, before);
}

#[tokio::test]
async fn simulate_is_deterministic_covers_every_operation_and_keeps_stock_consistent() {
    let pg = PgCluster::start();
    let opts = SimulateOptions {
        seed: 11,
        rate: 1_000_000.0,
        duration: Duration::from_secs(300),
        profile: Profile::Steady,
        max_transactions: Some(300),
    };
    let mut runs = Vec::new();
    for (db, seed) in [("run_a", 11), ("run_b", 11), ("run_c", 12)] {
        let client = pg.database(db).await;
        legacy_fixtures::init(&client, &SMALL).await.expect("init");
        let report = legacy_fixtures::simulate(
            &client,
            &SimulateOptions {
                seed,
                ..opts.clone()
            },
        )
        .await
        .expect("simulate");
        assert_eq!(report.transactions, 300);
        assert_stock_consistent(&client).await;
        runs.push((report, checksums(&client).await, client));
    }

    let (a, sums_a, client_a) = &runs[0];
    let (b, sums_b, _) = &runs[1];
    let (_, sums_c, _) = &runs[2];
    for kind in OpKind::ALL {
        assert!(
            a.count(kind) > 0,
            "{} never ran in 300 transactions: {:?}",
            kind.as_str(),
            a.counts
        );
    }
    assert_eq!(a.counts, b.counts);
    assert_eq!(a.skipped, b.skipped);
    assert_eq!(sums_a, sums_b, "same seed, different final tables");
    let differing = sums_a.iter().zip(sums_c).filter(|(x, y)| x != y).count();
    assert!(
        differing >= 5,
        "a different seed should change most tables, changed {differing}"
    );

    // The workload actually wrote what it reports.
    let sim_orders = count(
        client_a,
        "select count(*) from oms.orders where placed_at >= '2025-01-01'",
    )
    .await;
    assert_eq!(sim_orders as u64, a.count(OpKind::PlaceOrder));
    let receipts =
        count(client_a, "select count(*) from wms.stock_movements where kind = 'receipt' and created_at >= '2025-01-01'")
            .await;
    assert_eq!(receipts as u64, a.count(OpKind::ReceiveStock));

    // The cache job catches up with everything the workload changed since its last run.
    client_a
        .query_one("select oms.refresh_inventory_cache()", &[])
        .await
        .expect("refresh");
    let drift = "select count(*) from oms.inventory_cache c join wms.stock_levels s using (sku, location_code)
                 where c.available <> greatest(s.on_hand - s.reserved, 0)";
    assert_eq!(
        count(client_a, drift).await,
        0,
        "inventory cache still differs after a refresh"
    );
}

#[tokio::test]
async fn place_order_reserves_stock_and_refuses_to_oversell() {
    let pg = PgCluster::start();
    let client = pg.database("orders").await;
    legacy_fixtures::init(&client, &SMALL).await.expect("init");

    let best = client
        .query_one(
            "select location_code::text, reserved, on_hand - reserved from wms.stock_levels
             where sku = 'SKU-000001' order by on_hand - reserved desc, location_code limit 1",
            &[],
        )
        .await
        .expect("stock of SKU-000001");
    let (loc, reserved, available): (String, i32, i32) = (best.get(0), best.get(1), best.get(2));
    assert!(available >= 2, "seed gives SKU-000001 no stock to sell");

    // Called the way the legacy app calls it: two arguments, server clock.
    let id: i64 = client
        .query_one(
            "select oms.place_order(1, '[{\"sku\": \"SKU-000001\", \"qty\": 2}]')",
            &[],
        )
        .await
        .expect("place_order")
        .get(0);
    let now_reserved: i32 = client
        .query_one(
            "select reserved from wms.stock_levels where sku = 'SKU-000001' and location_code = $1",
            &[&loc],
        )
        .await
        .expect("reserved")
        .get(0);
    assert_eq!(now_reserved, reserved + 2);
    let line = client
        .query_one(
            "select o.status::text, l.reserved_location::text, o.total = 2 * p.price
             from oms.orders o join oms.order_lines l on l.order_id = o.id
             join oms.prices p on p.sku = l.sku and p.currency = 'EUR' where o.id = $1",
            &[&id],
        )
        .await
        .expect("order line");
    assert_eq!(line.get::<_, String>(0), "pending");
    assert_eq!(line.get::<_, String>(1), loc);
    assert!(line.get::<_, bool>(2), "order total is not qty * price");

    // More than any location has: the whole order is refused and nothing is reserved.
    let orders_before = count(&client, "select count(*) from oms.orders").await;
    let reserved_before = count(&client, "select sum(reserved) from wms.stock_levels").await;
    let err = client
        .query_one(
            "select oms.place_order(1, '[{\"sku\": \"SKU-000002\", \"qty\": 1}, {\"sku\": \"SKU-000001\", \"qty\": 100000}]')",
            &[],
        )
        .await
        .expect_err("oversell must fail");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("insufficient stock")),
        "{err}"
    );
    assert_eq!(
        count(&client, "select count(*) from oms.orders").await,
        orders_before
    );
    assert_eq!(
        count(&client, "select sum(reserved) from wms.stock_levels").await,
        reserved_before
    );
}

#[tokio::test]
async fn spike_opens_with_a_sale_and_steady_runs_are_paced() {
    let pg = PgCluster::start();
    let client = pg.database("spike").await;
    legacy_fixtures::init(&client, &SMALL).await.expect("init");

    let sale_before = count(
        &client,
        "select count(*) from oms.prices where valid_from >= '2025-01-01'",
    )
    .await;
    assert_eq!(sale_before, 0);
    let spike = legacy_fixtures::simulate(
        &client,
        &SimulateOptions {
            seed: 3,
            rate: 1_000_000.0,
            duration: Duration::from_secs(300),
            profile: Profile::Spike,
            max_transactions: Some(200),
        },
    )
    .await
    .expect("spike");
    assert!(spike.count(OpKind::BulkReprice) >= 1);
    assert!(
        count(
            &client,
            "select count(*) from oms.prices where valid_from >= '2025-01-01'"
        )
        .await
            > 0
    );
    assert!(
        spike.count(OpKind::PlaceOrder) * 2 > spike.transactions,
        "spike should be mostly orders: {:?}",
        spike.counts
    );

    // 100 tx/s for one second: the schedule has 100 slots and the run lasts the full second.
    let steady = legacy_fixtures::simulate(
        &client,
        &SimulateOptions {
            seed: 4,
            rate: 100.0,
            duration: Duration::from_secs(1),
            profile: Profile::Steady,
            max_transactions: None,
        },
    )
    .await
    .expect("steady");
    assert!((1..=100).contains(&steady.transactions), "{steady:?}");
    assert!(steady.elapsed >= Duration::from_millis(990), "{steady:?}");
    assert!(steady.achieved_rate <= 101.0, "{steady:?}");
    assert_stock_consistent(&client).await;

    let bad = legacy_fixtures::simulate(
        &client,
        &SimulateOptions {
            rate: 0.0,
            ..Default::default()
        },
    )
    .await;
    assert!(matches!(
        bad,
        Err(legacy_fixtures::FixtureError::InvalidOptions(_))
    ));
}
