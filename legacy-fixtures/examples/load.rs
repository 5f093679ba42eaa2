//! Loads the legacy fixture at default scale and runs a short workload against it.
//!
//! `cargo run -p legacy-fixtures --example load -- "host=127.0.0.1 port=5432 user=postgres"`
//! Optional second and third arguments: transactions per second (default 100) and seconds (10).

use std::time::Duration;

use legacy_fixtures::{InitOptions, Profile, SimulateOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let conninfo = args
        .next()
        .ok_or("usage: load <conninfo> [rate] [seconds]")?;
    let rate: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100.0);
    let secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10);
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);

    let init = legacy_fixtures::init(&client, &InitOptions::default()).await?;
    println!("init: {} rows in {:.1?}", init.total_rows(), init.elapsed);
    for (table, rows) in &init.rows {
        println!("  {table:<22} {rows:>9}");
    }
    let opts = SimulateOptions {
        rate,
        duration: Duration::from_secs(secs),
        profile: Profile::Spike,
        ..Default::default()
    };
    let sim = legacy_fixtures::simulate(&client, &opts).await?;
    println!(
        "simulate: {} transactions ({} skipped) in {:.1?}, {:.0} tx/s",
        sim.transactions, sim.skipped, sim.elapsed, sim.achieved_rate
    );
    for (kind, n) in &sim.counts {
        println!("  {:<24} {n:>7}", kind.as_str());
    }
    Ok(())
}
