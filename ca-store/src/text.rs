//! Enumerations stored as TEXT: the stored spelling is the one `as_str` gives, on both
//! backends and in JSON, so that the enums type what the columns already held as strings.

/// A stored value that names no variant of the enumeration it was read as.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

/// Declares a fieldless enum with its stored spelling per variant, and derives from that one
/// table `as_str`, `Display`, `FromStr`, serde and the sqlx impls (over `str`, so TEXT on
/// SQLite and PostgreSQL alike).
macro_rules! text_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::text::UnknownValue;

            fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::text::UnknownValue { what: stringify!($name), value: s.to_string() }),
                }
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                // The message serde's derive gives, so that a wrong value reads as before.
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(|_| serde::de::Error::unknown_variant(&s, &[$($text),+]))
            }
        }

        impl<DB: sqlx::Database> sqlx::Type<DB> for $name
        where
            str: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as sqlx::Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $name
        where
            &'static str: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as sqlx::Database>::ArgumentBuffer,
            ) -> std::result::Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&'static str as sqlx::Encode<'q, DB>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $name
        where
            &'r str: sqlx::Decode<'r, DB>,
        {
            fn decode(value: <DB as sqlx::Database>::ValueRef<'r>) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                Ok(<&'r str as sqlx::Decode<'r, DB>>::decode(value)?.parse()?)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::{ClusterMode, ClusterStatus, RequestStatus};

    #[test]
    fn spellings_are_the_stored_strings() {
        let spelled: Vec<&str> = ClusterStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(spelled, ["pending", "active", "rejected"]);
        assert_eq!(ClusterMode::ExternalCa.as_str(), "external-ca");
        assert_eq!(ClusterMode::Plugin.as_str(), "plugin");
        let spelled: Vec<&str> = RequestStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(spelled, ["pending", "approved", "rejected"]);
        assert_eq!(serde_json::to_string(&ClusterMode::ExternalCa).unwrap(), "\"external-ca\"");
        assert_eq!(serde_json::from_str::<ClusterMode>("\"external-ca\"").unwrap(), ClusterMode::ExternalCa);
        assert_eq!("active".parse::<ClusterStatus>(), Ok(ClusterStatus::Active));
        assert!("Active".parse::<ClusterStatus>().is_err());
        let e = serde_json::from_str::<RequestStatus>("\"done\"").unwrap_err().to_string();
        assert!(e.starts_with("unknown variant `done`, expected one of `pending`, `approved`, `rejected`"), "{e}");
    }
}
