//! Where an export's files live: a local directory (`--export-dir`), or a bucket
//! (`--export-storage s3://BUCKET[/PREFIX]`), each job's files under `<job>/`.
//!
//! A file is written through a [`Sink`]: a local file, synced at the end, or a streaming
//! multipart upload whose parts (`--s3-part-size`) go up while the next one fills, two at a
//! time at most, so memory stays at a few parts whatever the file's size. A file exists (is
//! listed, can be read) only once its sink finished; a sink dropped before (a task that failed
//! or was cancelled) aborts its upload, leaving no parts behind.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::path::Path as Key;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

use crate::bulk::stream::ByteStream;
use crate::objects::ObjectError;

/// Uploads of one file in flight at once (the part being filled is one more).
const PARTS_IN_FLIGHT: usize = 2;

/// Where the files go.
pub enum ExportStorage {
    Local {
        dir: PathBuf,
    },
    Bucket {
        client: Arc<AmazonS3>,
        /// `s3://bucket/prefix`, for messages.
        name: String,
        /// Keys start with this (no trailing `/`; empty: the bucket's root).
        prefix: String,
        part_size: usize,
    },
}

/// A file being written.
pub trait FileSink: Send {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, io::Result<()>>;
    /// Makes the file whole and visible (synced, or its upload completed).
    fn finish(self: Box<Self>) -> BoxFuture<'static, io::Result<()>>;
}

pub type Sink = Box<dyn FileSink>;

/// A file opened for reading: its bytes (or the range asked for) and its whole length.
pub struct Opened {
    pub body: ByteStream,
    pub length: u64,
}

/// The media type of an export file, by its name.
pub fn media_type(name: &str) -> &'static str {
    if name.ends_with(".csv") {
        "text/csv"
    } else if name.ends_with(".parquet") {
        "application/vnd.apache.parquet"
    } else {
        "application/fhir+ndjson"
    }
}

fn storage_error(what: String, error: &object_store::Error) -> io::Error {
    io::Error::other(ObjectError::storage(what, error))
}

impl ExportStorage {
    /// Where this is, for the log and messages.
    pub fn describe(&self) -> String {
        match self {
            ExportStorage::Local { dir } => dir.display().to_string(),
            ExportStorage::Bucket { name, .. } => name.clone(),
        }
    }

    /// Whether files can be downloaded straight from the storage with a signed URL.
    pub fn signs(&self) -> bool {
        matches!(self, ExportStorage::Bucket { .. })
    }

    fn key(&self, job: &str, name: &str) -> Key {
        match self {
            ExportStorage::Bucket { prefix, .. } if !prefix.is_empty() => {
                Key::from(format!("{prefix}/{job}/{name}"))
            }
            _ => Key::from(format!("{job}/{name}")),
        }
    }

    fn job_prefix(&self, job: &str) -> Key {
        match self {
            ExportStorage::Bucket { prefix, .. } if !prefix.is_empty() => {
                Key::from(format!("{prefix}/{job}"))
            }
            _ => Key::from(job),
        }
    }

    /// Starts writing file `name` of `job`.
    pub async fn create(&self, job: &str, name: &str) -> io::Result<Sink> {
        match self {
            ExportStorage::Local { dir } => {
                let dir = dir.join(job);
                tokio::fs::create_dir_all(&dir).await?;
                let file = tokio::fs::File::create(dir.join(name)).await?;
                Ok(Box::new(LocalSink(BufWriter::with_capacity(1 << 20, file))))
            }
            ExportStorage::Bucket {
                client, part_size, ..
            } => {
                let key = self.key(job, name);
                // Its type goes with the object, for clients that download it straight.
                let mut attributes = object_store::Attributes::new();
                attributes.insert(
                    object_store::Attribute::ContentType,
                    media_type(name).into(),
                );
                let options = object_store::PutMultipartOptions {
                    attributes,
                    ..Default::default()
                };
                let upload = client
                    .put_multipart_opts(&key, options)
                    .await
                    .map_err(|e| storage_error(format!("starting the upload of {key}"), &e))?;
                Ok(Box::new(UploadSink {
                    upload: Some(WriteMultipart::new_with_chunk_size(upload, *part_size)),
                    key: key.to_string(),
                }))
            }
        }
    }

    /// Writes a small file whole (an export's warnings).
    pub async fn put(&self, job: &str, name: &str, data: Bytes) -> io::Result<()> {
        let mut sink = self.create(job, name).await?;
        sink.write(&data).await?;
        sink.finish().await
    }

    /// The names of a job's files.
    pub async fn names(&self, job: &str) -> io::Result<Vec<String>> {
        match self {
            ExportStorage::Local { dir } => {
                let mut names = Vec::new();
                let mut entries = match tokio::fs::read_dir(dir.join(job)).await {
                    Ok(entries) => entries,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(names),
                    Err(error) => return Err(error),
                };
                while let Some(entry) = entries.next_entry().await? {
                    names.push(entry.file_name().to_string_lossy().to_string());
                }
                Ok(names)
            }
            ExportStorage::Bucket { client, .. } => {
                let prefix = self.job_prefix(job);
                client
                    .list(Some(&prefix))
                    .map_ok(|meta| meta.location.filename().unwrap_or_default().to_string())
                    .try_collect()
                    .await
                    .map_err(|e| storage_error(format!("listing {prefix}"), &e))
            }
        }
    }

    /// Deletes the files of `job` whose names `doomed` picks.
    pub async fn remove(&self, job: &str, doomed: impl Fn(&str) -> bool) -> io::Result<()> {
        for name in self.names(job).await? {
            if !doomed(&name) {
                continue;
            }
            match self {
                ExportStorage::Local { dir } => {
                    match tokio::fs::remove_file(dir.join(job).join(&name)).await {
                        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
                        _ => {}
                    }
                }
                ExportStorage::Bucket { client, .. } => {
                    let key = self.key(job, &name);
                    match client.delete(&key).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(error) => return Err(storage_error(format!("deleting {key}"), &error)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Deletes every file of `job`.
    pub async fn remove_job(&self, job: &str) -> io::Result<()> {
        match self {
            ExportStorage::Local { dir } => match tokio::fs::remove_dir_all(dir.join(job)).await {
                Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
                _ => Ok(()),
            },
            ExportStorage::Bucket { .. } => self.remove(job, |_| true).await,
        }
    }

    /// Opens file `name` of `job` (`None`: there is none), the bytes `range` only if asked.
    pub async fn open(
        &self,
        job: &str,
        name: &str,
        range: Option<(u64, u64)>,
    ) -> io::Result<Option<Opened>> {
        match self {
            ExportStorage::Local { dir } => {
                let mut file = match tokio::fs::File::open(dir.join(job).join(name)).await {
                    Ok(file) => file,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(error) => return Err(error),
                };
                let length = file.metadata().await?.len();
                let body: ByteStream = match range {
                    Some((start, end)) => {
                        file.seek(io::SeekFrom::Start(start)).await?;
                        Box::pin(tokio_util::io::ReaderStream::with_capacity(
                            file.take(end + 1 - start),
                            256 * 1024,
                        ))
                    }
                    None => Box::pin(tokio_util::io::ReaderStream::with_capacity(
                        file,
                        256 * 1024,
                    )),
                };
                Ok(Some(Opened { body, length }))
            }
            ExportStorage::Bucket { client, .. } => {
                let key = self.key(job, name);
                let options = GetOptions {
                    range: range.map(|(start, end)| GetRange::Bounded(start..end + 1)),
                    ..GetOptions::default()
                };
                let got = match client.get_opts(&key, options).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(error) => return Err(storage_error(format!("reading {key}"), &error)),
                };
                let length = got.meta.size;
                let body = got
                    .into_stream()
                    .map(move |chunk| chunk.map_err(io::Error::other));
                Ok(Some(Opened {
                    body: Box::pin(body),
                    length,
                }))
            }
        }
    }

    /// The length of file `name` of `job`, if it exists.
    pub async fn size(&self, job: &str, name: &str) -> io::Result<Option<u64>> {
        match self {
            ExportStorage::Local { dir } => {
                match tokio::fs::metadata(dir.join(job).join(name)).await {
                    Ok(meta) => Ok(Some(meta.len())),
                    Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(error) => Err(error),
                }
            }
            ExportStorage::Bucket { client, .. } => {
                let key = self.key(job, name);
                match client.head(&key).await {
                    Ok(meta) => Ok(Some(meta.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(error) => Err(storage_error(format!("looking at {key}"), &error)),
                }
            }
        }
    }

    /// A URL that downloads file `name` of `job` straight from the storage for `lifetime`
    /// (`None` for a local directory).
    pub async fn signed_url(
        &self,
        job: &str,
        name: &str,
        lifetime: Duration,
    ) -> io::Result<Option<String>> {
        match self {
            ExportStorage::Local { .. } => Ok(None),
            ExportStorage::Bucket { client, .. } => {
                let key = self.key(job, name);
                let url = client
                    .signed_url(object_store::signer::Method::GET, &key, lifetime)
                    .await
                    .map_err(|e| storage_error(format!("signing a URL for {key}"), &e))?;
                Ok(Some(url.to_string()))
            }
        }
    }

    /// The jobs that have files here, with when their files last changed.
    pub async fn jobs(&self) -> io::Result<Vec<(String, Option<SystemTime>)>> {
        match self {
            ExportStorage::Local { dir } => {
                let mut jobs = Vec::new();
                let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
                    return Ok(jobs);
                };
                while let Some(entry) = entries.next_entry().await? {
                    let changed = entry.metadata().await.and_then(|m| m.modified()).ok();
                    jobs.push((entry.file_name().to_string_lossy().to_string(), changed));
                }
                Ok(jobs)
            }
            ExportStorage::Bucket { client, prefix, .. } => {
                let root = (!prefix.is_empty()).then(|| Key::from(prefix.as_str()));
                let mut latest: std::collections::HashMap<String, SystemTime> =
                    std::collections::HashMap::new();
                let mut objects = client.list(root.as_ref());
                while let Some(meta) = objects.next().await {
                    let meta = meta.map_err(|e| storage_error("listing exports".into(), &e))?;
                    let mut parts = meta.location.parts();
                    if !prefix.is_empty() {
                        for _ in prefix.split('/') {
                            parts.next();
                        }
                    }
                    let Some(job) = parts.next() else { continue };
                    let at = SystemTime::from(meta.last_modified);
                    let entry = latest.entry(job.as_ref().to_string()).or_insert(at);
                    *entry = (*entry).max(at);
                }
                Ok(latest
                    .into_iter()
                    .map(|(job, at)| (job, Some(at)))
                    .collect())
            }
        }
    }
}

/// A local file.
struct LocalSink(BufWriter<tokio::fs::File>);

impl FileSink for LocalSink {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(self.0.write_all(data))
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async move {
            self.0.flush().await?;
            self.0.get_mut().sync_all().await
        })
    }
}

/// A multipart upload; aborted when dropped unfinished.
struct UploadSink {
    upload: Option<WriteMultipart>,
    key: String,
}

impl FileSink for UploadSink {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let key = self.key.clone();
            let upload = self
                .upload
                .as_mut()
                .ok_or_else(|| io::Error::other("the upload has ended"))?;
            // Parts go up while the next fills; no more than a few at once in memory.
            upload
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| storage_error(format!("uploading {key}"), &e))?;
            upload.write(data);
            Ok(())
        })
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async move {
            let key = self.key.clone();
            let upload = self
                .upload
                .take()
                .ok_or_else(|| io::Error::other("the upload has ended"))?;
            upload
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| storage_error(format!("completing the upload of {key}"), &e))
        })
    }
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            let key = std::mem::take(&mut self.key);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(error) = upload.abort().await {
                        tracing::warn!(key, error = %crate::objects::describe(&error), "could not abort an unfinished upload");
                    }
                });
            }
        }
    }
}

impl ExportStorage {
    /// Whether the storage answers (listing one key), within seconds.
    pub async fn reachable(&self) -> Result<(), ObjectError> {
        let ExportStorage::Bucket {
            client,
            name,
            prefix,
            ..
        } = self
        else {
            return Ok(());
        };
        let root = (!prefix.is_empty()).then(|| Key::from(prefix.as_str()));
        let listed = tokio::time::timeout(Duration::from_secs(10), async {
            client.list(root.as_ref()).next().await.transpose()
        })
        .await;
        match listed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(ObjectError::storage(
                format!("the export storage {name}"),
                &error,
            )),
            Err(_) => Err(ObjectError::Storage {
                what: format!("the export storage {name}"),
                why: "no answer within 10 s".into(),
            }),
        }
    }
}

impl ExportStorage {
    /// Multipart uploads in progress under the exports' keys, as (job, file name, upload id):
    /// a process killed while uploading leaves its upload behind (`object_store` lists no
    /// uploads, so this asks S3's ListMultipartUploads through a signed URL).
    pub async fn uploads(&self) -> io::Result<Vec<(String, String, String)>> {
        let ExportStorage::Bucket { client, prefix, .. } = self else {
            return Ok(Vec::new());
        };
        let listing = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let options = object_store::signer::SignedUrlOptions::new()
            .with_query([("uploads", ""), ("prefix", listing.as_str())]);
        let url = client
            .signed_url_opts(
                object_store::signer::Method::GET,
                &Key::from(""),
                Duration::from_secs(60),
                &options,
            )
            .await
            .map_err(|e| storage_error("listing uploads".into(), &e))?;
        let response = plain_client()
            .get(url.as_str())
            .send()
            .await
            .map_err(io::Error::other)?;
        if !response.status().is_success() {
            return Err(io::Error::other(format!(
                "listing uploads: HTTP {}",
                response.status()
            )));
        }
        let text = response.text().await.map_err(io::Error::other)?;
        let mut found = Vec::new();
        for upload in text.split("<Upload>").skip(1) {
            let (Some(key), Some(id)) = (between(upload, "Key"), between(upload, "UploadId"))
            else {
                continue;
            };
            let key = key.strip_prefix(&listing).unwrap_or(key);
            if let Some((job, name)) = key.split_once('/') {
                found.push((job.to_string(), name.to_string(), id.to_string()));
            }
        }
        Ok(found)
    }

    /// Aborts an upload [`ExportStorage::uploads`] found.
    pub async fn abort(&self, job: &str, name: &str, id: &str) -> io::Result<()> {
        let ExportStorage::Bucket { client, .. } = self else {
            return Ok(());
        };
        let key = self.key(job, name);
        let options = object_store::signer::SignedUrlOptions::new().with_query([("uploadId", id)]);
        let url = client
            .signed_url_opts(
                object_store::signer::Method::DELETE,
                &key,
                Duration::from_secs(60),
                &options,
            )
            .await
            .map_err(|e| storage_error(format!("aborting the upload of {key}"), &e))?;
        let response = plain_client()
            .delete(url.as_str())
            .send()
            .await
            .map_err(io::Error::other)?;
        match response.status().as_u16() {
            200..=299 | 404 => Ok(()),
            status => Err(io::Error::other(format!(
                "aborting the upload of {key}: HTTP {status}"
            ))),
        }
    }
}

/// An HTTP client for signed URLs (they carry their own authorization).
fn plain_client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default()
        })
        .clone()
}

/// The text of the first `<tag>...</tag>` in `xml`.
fn between<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(&xml[start..end])
}
