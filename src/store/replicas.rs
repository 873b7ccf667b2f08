//! Read replicas: PostgreSQL streaming standbys (`--replica-url`) that take fhirbox's bulk
//! reads (`$dump`, `$dump-csv`, `$dump-sql`, view runs, `$export` and view-export tasks), so
//! minutes-long scans leave the primary to the writes and the interactive requests.
//!
//! **Nothing stale.** A bulk read fixes the primary's WAL position when it starts
//! ([`Readers::position`]; an export, at kick-off) and reads on a standby only once that
//! standby has replayed past it ([`Readers::route`]): whatever was committed before the read
//! began is there. It waits up to `max_wait` for one, then reads on the primary and says so in
//! the log. Without replicas none of this runs: no position is taken, every read is the
//! primary's.
//!
//! **Health.** A checker asks every standby each `check_interval` whether it is still in
//! recovery and how far it has replayed. One that is down, promoted (no longer a standby: it
//! may have diverged) or lagging (its replay behind what the primary had written `max_wait`
//! ago) is skipped until it recovers; each change is logged once and shown in metrics. Routing
//! asks the chosen standby again right before a read, so a standby that died since the last
//! check costs a failed query, not a failed request.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::types::PgLsn;

use super::{PoolSettings, Store, StoreError};

/// How fhirbox uses its replicas.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// The standbys, as fhirbox connects to them (its own role and database).
    pub servers: Vec<tokio_postgres::Config>,
    /// How long a read waits for a standby to replay up to its start before it reads on the
    /// primary; also how far behind a standby may fall before it counts as lagging.
    pub max_wait: Duration,
    /// How often every standby is checked.
    pub check_interval: Duration,
}

impl Default for ReplicaSettings {
    fn default() -> ReplicaSettings {
        ReplicaSettings {
            servers: Vec::new(),
            max_wait: Duration::from_secs(5),
            check_interval: Duration::from_secs(1),
        }
    }
}

/// A position in the primary's write-ahead log: everything committed before it was taken is
/// at or before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position(pub u64);

/// The pools of one server that bulk reads use: fhirbox's own role, and the two `$dump-sql`
/// roles.
#[derive(Clone)]
pub struct ReadPools {
    pub bulk: Store,
    pub sql_reader: Store,
    pub sql_admin: Store,
    /// `primary`, or `replica N (host)`: for the log.
    pub server: Arc<str>,
}

impl ReadPools {
    /// The primary's pools.
    pub fn primary(bulk: Store, sql_reader: Store, sql_admin: Store) -> ReadPools {
        ReadPools {
            bulk,
            sql_reader,
            sql_admin,
            server: PRIMARY.into(),
        }
    }

    pub fn is_primary(&self) -> bool {
        &*self.server == PRIMARY
    }

    fn close(&self) {
        for store in [&self.bulk, &self.sql_reader, &self.sql_admin] {
            store.close();
        }
    }
}

const PRIMARY: &str = "primary";

/// What the checker last found a standby to be.
#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Not checked yet: tried like a healthy one.
    Unknown,
    Up,
    Down(String),
    /// Out of recovery: a former standby that may have diverged; never read from.
    Promoted,
    /// Behind what the primary had written `max_wait` ago.
    Lagging,
}

struct Replica {
    pools: ReadPools,
    /// The label of its metrics: `replica N`.
    label: String,
    state: Mutex<State>,
}

/// Where bulk reads go: the primary's pools and the standbys'.
#[derive(Clone)]
pub struct Readers {
    inner: Arc<Inner>,
}

struct Inner {
    primary: ReadPools,
    replicas: Vec<Replica>,
    /// Round robin among the standbys.
    next: AtomicUsize,
    max_wait: Duration,
    check_interval: Duration,
    /// The primary's positions at recent checks: a standby behind the newest one older than
    /// `max_wait` is lagging.
    samples: Mutex<VecDeque<(Instant, Position)>>,
    geometry: Mutex<Option<WalGeometry>>,
    checker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The pools a standby gets, sized like the primary's: fhirbox's own (connecting as the
/// standby's URL says) and the `$dump-sql` roles' (as they connect to the primary, but on the
/// standby's hosts and ports).
pub struct ReplicaPools<'a> {
    pub bulk: PoolSettings,
    pub sql_reader: (&'a tokio_postgres::Config, PoolSettings),
    pub sql_admin: (&'a tokio_postgres::Config, PoolSettings),
}

impl Readers {
    /// Readers over `primary` and the standbys of `settings`, whose pools are made like the
    /// primary's (`pools`); starts the health checker when there are standbys.
    pub fn start(
        primary: ReadPools,
        settings: &ReplicaSettings,
        pools: ReplicaPools<'_>,
    ) -> Result<Readers, StoreError> {
        let mut replicas = Vec::new();
        for (index, server) in settings.servers.iter().enumerate() {
            let pool = |(role, settings): &(&tokio_postgres::Config, PoolSettings)| {
                Store::with_settings(on_server(role, server), settings.clone())
            };
            let label = format!("replica {}", index + 1);
            replicas.push(Replica {
                pools: ReadPools {
                    bulk: Store::with_settings(server.clone(), pools.bulk.clone())?,
                    sql_reader: pool(&pools.sql_reader)?,
                    sql_admin: pool(&pools.sql_admin)?,
                    server: format!("{label} ({})", describe(server)).into(),
                },
                label,
                state: Mutex::new(State::Unknown),
            });
        }
        let readers = Readers::build(primary, replicas, settings);
        if !readers.inner.replicas.is_empty() {
            let checker = tokio::spawn(readers.clone().check_forever());
            *lock(&readers.inner.checker) = Some(checker);
        }
        Ok(readers)
    }

    fn build(primary: ReadPools, replicas: Vec<Replica>, settings: &ReplicaSettings) -> Readers {
        Readers {
            inner: Arc::new(Inner {
                primary,
                replicas,
                next: AtomicUsize::new(0),
                max_wait: settings.max_wait,
                check_interval: settings.check_interval,
                samples: Mutex::new(VecDeque::new()),
                geometry: Mutex::new(None),
                checker: Mutex::new(None),
            }),
        }
    }

    /// The primary's pools (reads that must see their own writes, or that need temporary
    /// tables).
    pub fn primary(&self) -> ReadPools {
        self.inner.primary.clone()
    }

    /// The primary's WAL position now, when there are standbys to route to (`None`: there
    /// are none, every read is the primary's).
    pub async fn position(&self) -> Result<Option<Position>, StoreError> {
        if self.inner.replicas.is_empty() {
            return Ok(None);
        }
        let conn = self.inner.primary.bulk.connection().await?;
        let known = *lock(&self.inner.geometry);
        let geometry = match known {
            Some(geometry) => geometry,
            None => {
                let found = WalGeometry::of(&conn).await?;
                *lock(&self.inner.geometry) = Some(found);
                found
            }
        };
        let row = conn
            .query_one("SELECT pg_current_wal_insert_lsn()", &[])
            .await?;
        let insert: PgLsn = row.get(0);
        Ok(Some(geometry.last_record_end(u64::from(insert))))
    }

    /// [`Readers::position`], then [`Readers::route`] to it: the pools for a read starting now.
    pub async fn now(&self, operation: &'static str) -> Result<ReadPools, StoreError> {
        let position = self.position().await?;
        Ok(self.route(position, operation).await)
    }

    /// The pools of a healthy standby that has replayed up to `position` (round robin among
    /// them), waiting up to `max_wait` for one; the primary's when there is none, or no
    /// position.
    pub async fn route(&self, position: Option<Position>, operation: &'static str) -> ReadPools {
        let Some(target) = position else {
            return self.primary();
        };
        let inner = &self.inner;
        let count = inner.replicas.len();
        let start = inner.next.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + inner.max_wait;
        loop {
            let mut healthy = 0;
            for offset in 0..count {
                let replica = &inner.replicas[(start + offset) % count];
                if !matches!(*lock(&replica.state), State::Up | State::Unknown) {
                    continue;
                }
                healthy += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                match replica.replayed(left.max(Duration::from_millis(100))).await {
                    Ok(replayed) if replayed >= target => {
                        crate::metrics::bulk_read(operation, "replica");
                        return replica.pools.clone();
                    }
                    Ok(_) => {}
                    Err(reason) => replica.set(State::Down(reason)),
                }
            }
            let reason = match healthy {
                0 => "no standby is healthy",
                _ if Instant::now() >= deadline => {
                    "no standby replayed up to the read's start in time"
                }
                _ => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if healthy > 0 {
                tracing::warn!(
                    operation,
                    waited_ms = inner.max_wait.as_millis() as u64,
                    "{reason}: reading on the primary"
                );
            } else {
                tracing::info!(operation, "{reason}: reading on the primary");
            }
            crate::metrics::bulk_read(operation, "primary");
            crate::metrics::replica_fallback(reason);
            return self.primary();
        }
    }

    /// Checks every standby each `check_interval`, for as long as the readers live.
    async fn check_forever(self) {
        let mut ticks = tokio::time::interval(self.inner.check_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.check().await;
        }
    }

    /// One round of checks: the primary's position, then each standby against it.
    pub async fn check(&self) {
        let inner = &self.inner;
        let now = Instant::now();
        let lag_bar = match self.position().await {
            Ok(Some(position)) => {
                let mut samples = lock(&inner.samples);
                samples.push_back((now, position));
                // Keep the newest sample older than max_wait, and the ones since.
                while samples.len() > 1 && now.duration_since(samples[1].0) >= inner.max_wait {
                    samples.pop_front();
                }
                samples
                    .front()
                    .filter(|(at, _)| now.duration_since(*at) >= inner.max_wait)
                    .map(|(_, position)| *position)
            }
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "could not read the primary's WAL position");
                None
            }
        };
        let newest = lock(&inner.samples).back().map(|(_, p)| *p);
        for replica in &inner.replicas {
            let state = match replica.replayed_or_promoted(inner.check_interval).await {
                Ok(None) => State::Promoted,
                Ok(Some(replayed)) => {
                    if let Some(newest) = newest {
                        crate::metrics::replica_lag(
                            &replica.label,
                            newest.0.saturating_sub(replayed.0),
                        );
                    }
                    match lag_bar {
                        Some(bar) if replayed < bar => State::Lagging,
                        _ => State::Up,
                    }
                }
                Err(reason) => State::Down(reason),
            };
            replica.set(state);
        }
    }

    /// Stops the checker and closes every standby's pools (the primary's are the app's).
    pub fn stop(&self) {
        if let Some(checker) = lock(&self.inner.checker).take() {
            checker.abort();
        }
        for replica in &self.inner.replicas {
            replica.pools.close();
        }
    }

    /// Every standby as the last check left it: its label, whether bulk reads use it, and
    /// what the check found (for the console's health page).
    pub fn replica_states(&self) -> Vec<(String, bool, String)> {
        self.inner
            .replicas
            .iter()
            .map(|r| {
                let (up, detail) = match &*lock(&r.state) {
                    State::Unknown => (true, "not checked yet".to_string()),
                    State::Up => (true, "up, replaying".to_string()),
                    State::Down(reason) => (false, format!("down: {reason}")),
                    State::Promoted => {
                        (false, "promoted out of recovery: not read from".to_string())
                    }
                    State::Lagging => (false, "lagging behind the primary: skipped".to_string()),
                };
                (r.label.clone(), up, format!("{}: {detail}", r.pools.server))
            })
            .collect()
    }

    /// Every standby's pools, for the metrics of their connections.
    pub fn replica_pools(&self) -> Vec<(String, ReadPools)> {
        self.inner
            .replicas
            .iter()
            .map(|r| (r.label.clone(), r.pools.clone()))
            .collect()
    }
}

impl Replica {
    /// How far this standby has replayed, asked now (an error in words if it cannot say).
    async fn replayed(&self, limit: Duration) -> Result<Position, String> {
        match self.replayed_or_promoted(limit).await? {
            Some(position) => Ok(position),
            None => {
                self.set(State::Promoted);
                Err("it is no longer a standby".into())
            }
        }
    }

    /// `None` when the server is out of recovery.
    async fn replayed_or_promoted(&self, limit: Duration) -> Result<Option<Position>, String> {
        let ask = async {
            let conn = self
                .pools
                .bulk
                .connection()
                .await
                .map_err(|e| e.to_string())?;
            let row = conn
                .query_one("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()", &[])
                .await
                .map_err(|e| StoreError::from(e).to_string())?;
            let (recovering, replayed): (bool, Option<PgLsn>) = (row.get(0), row.get(1));
            Ok(match recovering {
                true => Some(Position(replayed.map_or(0, u64::from))),
                false => None,
            })
        };
        match tokio::time::timeout(limit, ask).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
        }
    }

    /// Records what the standby is; logs and counts a change.
    fn set(&self, state: State) {
        let mut current = lock(&self.state);
        if *current == state {
            return;
        }
        let server = &*self.pools.server;
        match &state {
            State::Up => tracing::info!(replica = server, "the standby is up"),
            State::Down(reason) => {
                tracing::warn!(replica = server, reason = %reason, "the standby is down: bulk reads skip it")
            }
            State::Promoted => tracing::warn!(
                replica = server,
                "the standby is out of recovery (promoted?): bulk reads skip it"
            ),
            State::Lagging => tracing::warn!(
                replica = server,
                "the standby lags: bulk reads skip it until it catches up"
            ),
            State::Unknown => {}
        }
        crate::metrics::replica_up(&self.label, state == State::Up);
        *current = state;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `role`'s user, password, database and options, on `server`'s hosts and ports.
pub fn on_server(
    role: &tokio_postgres::Config,
    server: &tokio_postgres::Config,
) -> tokio_postgres::Config {
    let mut moved = tokio_postgres::Config::new();
    for host in server.get_hosts() {
        match host {
            tokio_postgres::config::Host::Tcp(name) => moved.host(name),
            tokio_postgres::config::Host::Unix(path) => moved.host_path(path),
        };
    }
    for port in server.get_ports() {
        moved.port(*port);
    }
    // Everything but where to connect stays the role's.
    if let Some(user) = role.get_user() {
        moved.user(user);
    }
    if let Some(password) = role.get_password() {
        moved.password(password);
    }
    if let Some(dbname) = role.get_dbname().or(server.get_dbname()) {
        moved.dbname(dbname);
    }
    if let Some(name) = role.get_application_name() {
        moved.application_name(name);
    }
    if let Some(timeout) = role.get_connect_timeout().or(server.get_connect_timeout()) {
        moved.connect_timeout(*timeout);
    }
    moved.ssl_mode(server.get_ssl_mode());
    moved
}

/// A server's address for the log: hosts and ports, never the password.
pub fn describe(server: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = server
        .get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = server.get_ports().iter().map(u16::to_string).collect();
    match ports.is_empty() {
        true => hosts.join(","),
        false => format!("{}:{}", hosts.join(","), ports.join(",")),
    }
}

/// The primary's WAL page and segment sizes: needed to read its insert position right.
#[derive(Debug, Clone, Copy)]
struct WalGeometry {
    block: u64,
    segment: u64,
}

/// The header at the start of a WAL page, and the longer one at the start of a segment.
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

impl WalGeometry {
    async fn of(conn: &super::Connection) -> Result<WalGeometry, StoreError> {
        let row = conn
            .query_one(
                "SELECT current_setting('wal_block_size')::bigint,
                        (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')",
                &[],
            )
            .await?;
        Ok(WalGeometry {
            block: row.get::<_, i64>(0).max(1) as u64,
            segment: row.get::<_, i64>(1).max(1) as u64,
        })
    }

    /// The end of the last record written, from the insert position: when the last record
    /// filled its page exactly, `pg_current_wal_insert_lsn()` points past the next page's
    /// header, which a standby's replay position (the end of the last record it replayed)
    /// never reaches until more is written. (`pg_current_wal_lsn()`, the write position, has
    /// no such gap but misses commits made with `synchronous_commit = off`.)
    fn last_record_end(&self, insert: u64) -> Position {
        if insert % self.segment == LONG_PAGE_HEADER {
            Position(insert - LONG_PAGE_HEADER)
        } else if insert % self.block == SHORT_PAGE_HEADER {
            Position(insert - SHORT_PAGE_HEADER)
        } else {
            Position(insert)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_position_past_a_page_header_means_the_record_before_it() {
        let wal = WalGeometry {
            block: 8192,
            segment: 16 * 1024 * 1024,
        };
        assert_eq!(wal.last_record_end(8192 * 3 + 24), Position(8192 * 3));
        assert_eq!(
            wal.last_record_end(8192 * 3 + 100),
            Position(8192 * 3 + 100)
        );
        assert_eq!(
            wal.last_record_end(16 * 1024 * 1024 + 40),
            Position(16 * 1024 * 1024)
        );
    }

    #[test]
    fn a_standby_connects_as_the_role_on_its_own_server() {
        let role: tokio_postgres::Config =
            "host=primary port=5432 user=fhirbox_sql_reader password=s dbname=fhirbox"
                .parse()
                .expect("config");
        let server: tokio_postgres::Config = "host=standby port=6432 user=fhirbox dbname=fhirbox"
            .parse()
            .expect("config");
        let moved = on_server(&role, &server);
        assert_eq!(
            moved.get_hosts(),
            &[tokio_postgres::config::Host::Tcp("standby".into())]
        );
        assert_eq!(moved.get_ports(), &[6432]);
        assert_eq!(moved.get_user(), Some("fhirbox_sql_reader"));
        assert_eq!(moved.get_password(), Some(&b"s"[..]));
        assert_eq!(describe(&server), "standby:6432");
    }
}
