//! An error with its sources, for logs: hyper-util's "client error (Connect)" and
//! tokio-postgres's "db error" say little; what went wrong (a refused connection, an untrusted
//! certificate, a password refused) is in their sources.

use std::error::Error;
use std::fmt;

/// Shows an error and each of its sources, `: `-separated; a source whose text the one above
/// it already holds is not said twice.
pub(crate) struct Causes<'a>(pub(crate) &'a (dyn Error + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let said = self.0.to_string();
        f.write_str(&said)?;
        write_sources(f, said, self.0.source())
    }
}

/// Writes `: {source}` for `first` and each source below it, after text that said `said`.
pub(crate) fn write_sources(
    f: &mut fmt::Formatter<'_>,
    mut said: String,
    first: Option<&(dyn Error + 'static)>,
) -> fmt::Result {
    let mut cause = first;
    while let Some(error) = cause {
        let text = error.to_string();
        if !said.contains(&text) {
            write!(f, ": {text}")?;
        }
        said = text;
        cause = error.source();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|l| l as &(dyn Error + 'static))
        }
    }

    #[test]
    fn every_source_is_said_once() {
        let error = Layer(
            "client error (Connect)",
            Some(Box::new(Layer(
                "tls: invalid peer certificate",
                Some(Box::new(Layer("invalid peer certificate", None))),
            ))),
        );
        assert_eq!(
            Causes(&error).to_string(),
            "client error (Connect): tls: invalid peer certificate"
        );
        assert_eq!(Causes(&Layer("alone", None)).to_string(), "alone");
    }
}
