//! Serde helpers for fields that Go KMM always serialises.
//!
//! Go writes a nil slice, map or pointer as `null` and an empty string as `""` when the JSON tag
//! has no `omitempty`. kmm-rs must read such objects, so those fields treat `null` like a missing
//! key and fall back to the type's default.

use serde::{Deserialize, Deserializer};

/// Deserialises `null` (or a missing key, together with `#[serde(default)]`) as `T::default()`.
pub fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// `skip_serializing_if` helper for booleans that Go tags with `omitempty`.
#[allow(clippy::trivially_copy_pass_by_ref)] // serde passes a reference
pub fn is_false(value: &bool) -> bool {
    !*value
}

/// Schema transform: drop the `default` schemars derives from `#[serde(default)]`, for fields
/// that are optional in Go KMM's schema but have no default there.
pub fn no_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// Marks `keys` required in an object schema and drops their defaults.
///
/// Go KMM's schema requires some keys that Go's decoder still reads as zero values when they are
/// missing. kmm-rs does the same: such fields carry `#[serde(default)]` (which makes schemars
/// treat them as optional) and a transform built on this function restores the schema.
fn require(schema: &mut schemars::Schema, keys: &[&str]) {
    if let Some(properties) = schema
        .get_mut("properties")
        .and_then(serde_json::Value::as_object_mut)
    {
        for key in keys {
            if let Some(field) = properties
                .get_mut(*key)
                .and_then(serde_json::Value::as_object_mut)
            {
                field.remove("default");
            }
        }
    }
    if schema.get("required").is_none() {
        schema.insert("required".into(), serde_json::json!([]));
    }
    if let Some(required) = schema
        .get_mut("required")
        .and_then(serde_json::Value::as_array_mut)
    {
        for key in keys {
            if !required.iter().any(|name| name == key) {
                required.push((*key).into());
            }
        }
        required.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
}

/// Defines a schema transform that marks the given keys required (see [`require`]).
macro_rules! required_keys {
    ($($name:ident => [$($key:literal),+ $(,)?];)+) => {
        $(
            #[doc = concat!("Schema transform: ", $("`", $key, "` "),+, "required.")]
            pub fn $name(schema: &mut schemars::Schema) {
                require(schema, &[$($key),+]);
            }
        )+
    };
}

required_keys! {
    require_insecure_pull => ["insecurePull"];
    require_selector => ["selector"];
    require_container => ["container"];
    require_mappings_and_modprobe => ["kernelMappings", "modprobe"];
    require_container_image => ["containerImage"];
}
