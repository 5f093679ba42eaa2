//! One error type for the fixtures: which step failed, and why.

/// What went wrong while building or driving the legacy database.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The options cannot produce a meaningful fixture; fix the caller.
    #[error("invalid fixture options: {0}")]
    InvalidOptions(String),

    /// A statement failed. `step` names what the fixture was doing.
    #[error(
        "legacy fixture step `{step}` failed: {source} (is the database reachable, was `init` run \
         on it, and may this user create schemas?)"
    )]
    Sql {
        step: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl FixtureError {
    pub(crate) fn sql(step: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        move |source| Self::Sql {
            step: step.into(),
            source,
        }
    }
}
