//! Dispatch: the rules between an approval and the provider. `intent` plans a send and folds
//! its steps; `answer` says what a provider's answer means; `compose` writes the text of the
//! channels that carry text. The dispatch stage in the shell makes the calls and carries out
//! what these return.

pub mod answer;
pub mod compose;
pub mod intent;

pub use answer::*;
pub use compose::*;
pub use intent::*;
