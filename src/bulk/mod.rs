//! The bulk API's operations: streaming exports and imports at the speed of PostgreSQL's own
//! COPY, in bounded memory.

pub mod allowance;
pub mod bounds;
pub mod dump;
pub mod dump_csv;
pub mod dump_sql;
pub mod export;
pub mod import;
pub mod job_list;
pub mod jobs;
pub mod lines;
pub mod load;
pub mod migrate;
pub mod native_line;
pub mod params;
pub mod prepare;
pub mod report;
pub mod source;
pub mod stream;

use std::sync::Arc;

use crate::formats::Formats;
use crate::store::Store;

/// The background work of a process: the job machinery's workers running imports and
/// exports, and the janitor that deletes expired export files.
#[derive(Clone)]
pub struct Background {
    pub jobs: jobs::Jobs,
    pub imports: import::Imports,
    pub exports: export::Exports,
}

impl Background {
    /// Builds the services and starts the workers and the janitor.
    pub fn start(
        store: Store,
        sources: source::Sources,
        formats: Formats,
        job_settings: jobs::JobSettings,
        export_settings: export::ExportSettings,
        storage: export::storage::ExportStorage,
        readers: crate::store::replicas::Readers,
    ) -> Background {
        let jobs = jobs::Jobs::new(store, job_settings);
        let imports = import::Imports::new(jobs.clone(), sources, formats.clone());
        let exports =
            export::Exports::new(jobs.clone(), formats, export_settings, storage, readers);
        jobs.spawn_workers(Arc::new(imports.clone()), Arc::new(exports.clone()));
        exports.spawn_janitor();
        Background {
            jobs,
            imports,
            exports,
        }
    }

    /// Stops the workers and the janitor, and gives back the tasks they held (shutdown).
    pub async fn stop(&self) {
        self.jobs.stop().await;
    }
}
