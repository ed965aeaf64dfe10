//! (in progress: colour normalisation shared by server and trainer)
