//! `s3://BUCKET/KEY` sources: objects read with fhirbox's own credentials (see
//! [`crate::objects`]), streamed like any other source. Since the credentials are the server's,
//! who may read what is fhirbox's to decide: root any bucket, a Client only the buckets and
//! prefixes an operator named (`--source-buckets`, none by default). A missing object or
//! bucket, denied access or refused credentials are said in words before anything is read.

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};

use super::{Opened, Reader, SourceError, Sources};
use crate::objects::{describe, Location};

impl Sources {
    /// Whether `reader` may read under `location`.
    fn bucket_allowed(&self, location: &Location, reader: Reader) -> Result<(), SourceError> {
        if reader == Reader::Root {
            return Ok(());
        }
        let allowed = self.policy.client_buckets.iter().any(|allowed| {
            allowed.bucket == location.bucket
                && (allowed.key.is_empty()
                    || location.key == allowed.key
                    || location
                        .key
                        .starts_with(&format!("{}/", allowed.key.trim_end_matches('/'))))
        });
        match allowed {
            true => Ok(()),
            false => Err(SourceError::BucketForbidden(location.to_string())),
        }
    }

    fn bucket(
        &self,
        location: &Location,
    ) -> Result<std::sync::Arc<object_store::aws::AmazonS3>, SourceError> {
        self.buckets
            .client(&location.bucket)
            .map_err(|e| SourceError::Bucket(e.to_string()))
    }

    /// Opens the object at `location` for streaming.
    pub(super) async fn open_s3(
        &self,
        location: &Location,
        reader: Reader,
    ) -> Result<Opened, SourceError> {
        self.bucket_allowed(location, reader)?;
        let client = self.bucket(location)?;
        let got = client
            .get(&Key::from(location.key.as_str()))
            .await
            .map_err(|e| object_error(location, &e))?;
        let size = Some(got.meta.size);
        let shown = location.to_string();
        let stream = got.into_stream().map(move |chunk| {
            chunk.map_err(|e| SourceError::Bucket(format!("reading {shown}: {}", describe(&e))))
        });
        Ok(Opened {
            stream: Box::pin(stream),
            size,
        })
    }

    /// Checks that the object at `location` is there and readable (for `$import`'s kick-off).
    pub(super) async fn check_s3(
        &self,
        location: &Location,
        reader: Reader,
    ) -> Result<(), SourceError> {
        self.bucket_allowed(location, reader)?;
        let client = self.bucket(location)?;
        client
            .head(&Key::from(location.key.as_str()))
            .await
            .map(drop)
            .map_err(|e| object_error(location, &e))
    }

    /// The objects under the prefix `url` (`s3://BUCKET/PREFIX/`), as URLs with their file
    /// names, in key order.
    pub async fn list(
        &self,
        url: &str,
        reader: Reader,
    ) -> Result<Vec<(String, String)>, SourceError> {
        let location = Location::parse(url).ok_or_else(|| SourceError::BadUrl(url.to_string()))?;
        self.bucket_allowed(&location, reader)?;
        let client = self.bucket(&location)?;
        let prefix = location.key.trim_end_matches('/');
        let prefix = (!prefix.is_empty()).then(|| Key::from(prefix));
        let mut found: Vec<(String, String)> = client
            .list(prefix.as_ref())
            .map_ok(|meta| {
                let name = meta.location.filename().unwrap_or_default().to_string();
                (format!("s3://{}/{}", location.bucket, meta.location), name)
            })
            .try_collect()
            .await
            .map_err(|e| object_error(&location, &e))?;
        found.sort();
        Ok(found)
    }
}

/// A storage error about `location`, in words.
fn object_error(location: &Location, error: &object_store::Error) -> SourceError {
    SourceError::Bucket(format!("{location}: {}", describe(error)))
}
