//! Real streaming standbys of the binary's test cluster: `pg_basebackup -R -X stream` over its
//! socket, then a second `postgres` on a socket of its own (see
//! [`fhirbox::cluster::throwaway::ThrowawayCluster::standby_of`]). Each test takes its own, so
//! it may pause, promote or stop it without disturbing the others.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fhirbox::cluster::throwaway::{default_parent, ThrowawayCluster};

/// A running standby; it stops when dropped (or at [`Standby::stop`]).
pub struct Standby {
    socket_dir: PathBuf,
    pub pid: u32,
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<std::thread::JoinHandle<()>>,
}

impl Standby {
    /// A standby of the test cluster, with the cluster's settings and `extra` ones
    /// (`recovery_min_apply_delay`, say). Its postmaster dies with the thread that started
    /// it, so a thread of its own keeps it until the handle goes.
    pub fn start(extra: &[(&str, &str)]) -> Standby {
        let primary_socket = super::cluster().socket_dir();
        let mut settings: Vec<(String, String)> = super::TEST_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        settings.push(("hot_standby_feedback".into(), "on".into()));
        settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let slot = format!(
            "standby_{}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let keeper = std::thread::Builder::new()
            .name("standby-keeper".into())
            .spawn(move || {
                let pairs: Vec<(&str, &str)> = settings
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                create_slot(&slot);
                let made =
                    ThrowawayCluster::standby_of(&primary_socket, &default_parent(), &slot, &pairs);
                match made {
                    Ok(cluster) => {
                        let _ =
                            ready_tx.send(Ok((cluster.socket_dir().to_path_buf(), cluster.pid())));
                        // Until stopped or the handle is dropped; dropping the cluster stops it.
                        let _ = stop_rx.recv();
                        drop(cluster);
                        drop_slot(&slot);
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error.to_string()));
                    }
                }
            })
            .expect("spawn a standby keeper");
        let (socket_dir, pid) = match ready_rx.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(error)) => panic!("the standby did not start: {error}"),
            Err(_) => panic!("the standby keeper died"),
        };
        Standby {
            socket_dir,
            pid,
            stop: Some(stop_tx),
            keeper: Some(keeper),
        }
    }

    /// How fhirbox connects to `database` on the standby (its `--replica-url`).
    pub fn config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .user("postgres")
            .dbname(database)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// A superuser connection to `database` on the standby.
    pub async fn connect(&self, database: &str) -> tokio_postgres::Client {
        super::connect(self.config(database)).await
    }

    /// Waits until the standby has `database` (a database created on the primary after the
    /// base backup arrives by replay).
    pub async fn wait_for_database(&self, database: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((client, connection)) =
                self.config(database).connect(tokio_postgres::NoTls).await
            {
                tokio::spawn(connection);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{database} never reached the standby"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the standby has replayed what the primary has written so far.
    pub async fn catch_up(&self, database: &str) {
        let primary = super::connect(super::cluster().config(database)).await;
        let target: tokio_postgres::types::PgLsn = primary
            .query_one("SELECT pg_current_wal_flush_lsn()", &[])
            .await
            .expect("position")
            .get(0);
        let standby = self.connect(database).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replayed: Option<tokio_postgres::types::PgLsn> = standby
                .query_one("SELECT pg_last_wal_replay_lsn()", &[])
                .await
                .expect("replay position")
                .get(0);
            if replayed.is_some_and(|r| u64::from(r) >= u64::from(target)) {
                return;
            }
            assert!(Instant::now() < deadline, "the standby never caught up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops it (PostgreSQL's immediate shutdown) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
    }
}

/// Runs `work` on a runtime of its own (the keeper thread has none).
fn block_on<F: std::future::Future>(work: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(work)
}

/// Creates a standby's replication slot on the primary, its WAL reserved from now on.
fn create_slot(slot: &str) {
    block_on(async {
        let client = super::connect(super::cluster().config("postgres")).await;
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&slot],
            )
            .await
            .expect("create the replication slot");
    })
}

/// Drops a standby's replication slot on the primary (or the primary keeps WAL for it).
fn drop_slot(slot: &str) {
    block_on(async {
        let client = super::connect(super::cluster().config("postgres")).await;
        // The walsender may take a moment to go after its standby.
        for _ in 0..100 {
            let dropped = client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
                      WHERE slot_name = $1 AND NOT active",
                    &[&slot],
                )
                .await;
            let left = client
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map(|row| row.get::<_, i64>(0))
                .unwrap_or(0);
            if dropped.is_ok() && left == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop();
    }
}
