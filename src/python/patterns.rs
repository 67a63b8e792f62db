//! Module-name patterns from adapter configs, matched by the `regex` crate: its automata run in
//! time linear in the name whatever the pattern (no backtracking), so an untrusted config such
//! as `target_modules = "(.*)*X"` cannot hang the loader. Compiled programs are size-limited.

use pyo3::prelude::*;

use super::guard;
use crate::Error;

/// Bytes a compiled pattern may take; a config needing more is refused, not built.
const COMPILED_LIMIT: usize = 1 << 20;
/// Longest pattern text accepted.
const PATTERN_LIMIT: usize = 4096;

/// regex_fullmatch(pattern, names) -> list[bool]
///
/// Whether each name matches ``pattern`` entirely (Python's ``re.fullmatch``), in linear time.
/// Raises ``InvalidArgumentError`` for a pattern that is too long, too large once compiled, or
/// uses what a linear-time engine cannot run (look-around, back-references).
#[pyfunction]
fn regex_fullmatch(pattern: &str, names: Vec<String>) -> PyResult<Vec<bool>> {
    guard(|| {
        if pattern.len() > PATTERN_LIMIT {
            return Err(Error::invalid(format!(
                "module-name pattern of {} characters is longer than {PATTERN_LIMIT}",
                pattern.len()
            )));
        }
        let re = regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .size_limit(COMPILED_LIMIT)
            .dfa_size_limit(COMPILED_LIMIT)
            .build()
            .map_err(|e| Error::invalid(format!("module-name pattern {pattern:?}: {e}")))?;
        Ok(names.iter().map(|n| re.is_match(n)).collect())
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(regex_fullmatch, m)?)?;
    Ok(())
}
