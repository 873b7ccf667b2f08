//! The conversion rules in force, for every request and bulk operation: the Attribute
//! resources read whole from the database and cached (`store::cached`), turned into
//! `format`'s rules and handed to it as a value. It sits above both, so that `format`
//! converts without reading the database and `store` knows nothing of conversion.
//!
//! Each use checks a cheap stamp of the `attribute` table (its newest version ids and row
//! count), so a created, changed or deleted Attribute takes effect on the next request, in
//! every fhirbox process, without a restart.

use std::sync::Arc;

use crate::format::attributes::Rules;
use crate::format::Converter;
use crate::resource_type::ResourceType;
use crate::store::cached::TableCache;
use crate::store::{Store, StoreError};

/// The conversion service, shared by all requests.
#[derive(Clone)]
pub struct Formats {
    store: Store,
    rules: Arc<TableCache<Rules>>,
}

impl Formats {
    pub fn new(store: Store) -> Formats {
        let attribute = ResourceType::parse("Attribute").expect("a fhirbox type");
        Formats {
            store,
            rules: Arc::new(TableCache::new(attribute)),
        }
    }

    /// A converter with the rules in force now.
    pub async fn converter(&self) -> Result<Converter, StoreError> {
        let rules = self
            .rules
            .get(&self.store, |attributes| {
                Rules::from_attributes(attributes.iter().map(|(_, body)| body))
            })
            .await?;
        Ok(Converter::with_shared(rules))
    }
}
