//! Read replicas: `$dump` of the largest type through a fhirbox whose bulk reads go to a real
//! streaming standby of the bench cluster, against the same through a fhirbox without one, in
//! the same run, with the primary PostgreSQL's CPU time during each. On one 2-core machine the
//! standby cannot make a dump faster; what this shows is that routing costs nothing and that
//! the primary is spared the scan.

use fhirbox::cluster::throwaway::ThrowawayCluster;

use super::server::Server;
use super::{best, http, psql, Row};

const SLOT: &str = "bench_standby";

/// CPU seconds of a postmaster and its children (live ones, and those it has reaped).
fn cluster_cpu(postmaster: u32) -> f64 {
    let fields = |pid: u32| -> Vec<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .map(|v| v.parse::<f64>().unwrap_or(0.0))
                    .collect()
            })
            .unwrap_or_default()
    };
    // After the name: utime, stime, cutime, cstime are the 12th to 15th fields.
    let own = |pid: u32, with_children: bool| {
        let f = fields(pid);
        let take = if with_children { 4 } else { 2 };
        f.get(11..11 + take).map_or(0.0, |v| v.iter().sum::<f64>()) / 100.0
    };
    let mut total = own(postmaster, true);
    let children =
        std::fs::read_to_string(format!("/proc/{postmaster}/task/{postmaster}/children"))
            .unwrap_or_default();
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        total += own(child, false);
    }
    total
}

/// Waits until the standby has replayed what the primary has written.
fn catch_up(primary_url: &str, standby_url: &str) {
    let lsn = |url: &str, query: &str| -> String {
        let output = std::process::Command::new("psql")
            .args(["-X", "-A", "-t", "-d", url, "-c", query])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let target = lsn(primary_url, "SELECT pg_current_wal_flush_lsn()");
    for _ in 0..6000 {
        let caught = lsn(
            standby_url,
            &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
        );
        if caught == "t" {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("the standby never caught up");
}

pub async fn replicas_benchmark(
    cluster: &ThrowawayCluster,
    local: &Server,
    client: &reqwest::Client,
    url: &str,
    largest: &str,
    largest_rows: usize,
) -> Vec<Row> {
    psql(
        url,
        &format!("SELECT pg_create_physical_replication_slot('{SLOT}', true)"),
    );
    let standby = cluster
        .standby(
            SLOT,
            &[
                ("shared_buffers", "1GB"),
                ("max_connections", "100"),
                ("hot_standby_feedback", "on"),
            ],
        )
        .expect("a standby of the bench cluster");
    let standby_url = standby.url(super::setup::DATABASE);
    catch_up(url, &standby_url);
    let routed = Server::start(url, &["--replica-url", &standby_url]);
    let path = format!("/{largest}/$dump");
    let mut on_primary: Option<(super::Measurement, f64)> = None;
    let mut on_standby: Option<(super::Measurement, f64)> = None;
    for _ in 0..3 {
        for (server, other, slot) in [
            (local, &routed, &mut on_primary),
            (&routed, local, &mut on_standby),
        ] {
            other.pause(true);
            let before = cluster_cpu(cluster.pid());
            let m =
                best(|| http(server, client, client.get(format!("{}{path}", server.base)))).await;
            let primary_cpu = (cluster_cpu(cluster.pid()) - before) / super::rounds() as f64;
            other.pause(false);
            if slot
                .as_ref()
                .is_none_or(|(best, _)| m.seconds < best.seconds)
            {
                *slot = Some((m, primary_cpu));
            }
        }
    }
    let (primary, primary_cpu) = on_primary.expect("rounds");
    let (replica, replica_cpu) = on_standby.expect("rounds");
    eprintln!(
        "GET /{largest}/$dump: the primary PostgreSQL used {primary_cpu:.2} CPU s a dump without a standby, {replica_cpu:.2} s with one"
    );
    drop(routed);
    drop(standby);
    psql(
        url,
        &format!(
            "SELECT pg_drop_replication_slot('{SLOT}') FROM pg_replication_slots WHERE slot_name = '{SLOT}'"
        ),
    );
    let baseline = primary.seconds;
    vec![
        Row {
            operation: format!("GET /{largest}/$dump on the primary"),
            rows: largest_rows,
            measurement: primary,
            baseline_seconds: baseline,
        },
        Row {
            operation: format!("GET /{largest}/$dump on a standby (vs primary)"),
            rows: largest_rows,
            measurement: replica,
            baseline_seconds: baseline,
        },
    ]
}
