//! BGP: the wire codec (`packet`), the per-neighbour session state machine (`fsm`), the
//! RIB with best-path selection (`rib`) and what is advertised to whom (`policy`).
pub mod packet;
