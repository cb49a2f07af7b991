//! Fault points at the saga's phase boundaries, for crash tests only. Switched on by the
//! test-only setting `HOLDFAST_FAULT_POINT=<name>`: when a checkout reaches that point the
//! process says so on stderr and stops making progress, so a test can SIGKILL it exactly
//! there and prove that recovery moves every checkout on.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// `charging` recorded, before the gateway call.
    AfterBeginCharge,
    /// The gateway answered, before the outcome is recorded.
    AfterGatewayCall,
    /// The success was recorded (order paid, outbox row written).
    AfterRecordSuccess,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 3] = [
        FaultPoint::AfterBeginCharge,
        FaultPoint::AfterGatewayCall,
        FaultPoint::AfterRecordSuccess,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::AfterBeginCharge => "after_begin_charge",
            FaultPoint::AfterGatewayCall => "after_gateway_call",
            FaultPoint::AfterRecordSuccess => "after_record_success",
        }
    }
}

impl FromStr for FaultPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown fault point {s:?}"))
    }
}

/// The marker a crash test waits for before it kills the process.
pub fn marker(point: FaultPoint) -> String {
    format!("FAULT POINT REACHED: {}", point.as_str())
}

/// Stops here forever if `armed` is this point.
pub async fn hit(armed: Option<FaultPoint>, point: FaultPoint) {
    if armed == Some(point) {
        eprintln!("{}", marker(point));
        std::future::pending::<()>().await;
    }
}
