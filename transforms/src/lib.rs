//! Business events and stream processors. Empty until the event contracts and live views land;
//! the crate exists so the workspace layout is the final one.
