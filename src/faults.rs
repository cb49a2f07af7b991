//! Fault points at the saga's phase boundaries and in the outbox relay, for crash tests only.
//! Switched on by the test-only setting `HOLDFAST_FAULT_POINT=<name>`: when work reaches that
//! point the process says so on stderr and stops making progress there, so a test can SIGKILL
//! it exactly there and prove that recovery moves every checkout on (promises 3 to 5).
//!
//! A crate-level module, not part of `checkout`, because the outbox relay has a point too and
//! must not depend on the saga.

use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// The reserve transaction committed (checkout `reserved`), before the customer is answered.
    AfterReserve,
    /// `charging` recorded, before the gateway call.
    AfterBeginCharge,
    /// The gateway answered, before the outcome is recorded.
    AfterGatewayCall,
    /// The success was recorded (order paid, outbox row written), or, for a late success whose
    /// units were gone, the money recorded as due back.
    AfterRecordSuccess,
    /// The decline was recorded (units released, order `payment_failed`).
    AfterRecordDecline,
    /// `requires_action` was recorded (order `payment_processing`), before the answer.
    AfterRecordRequiresAction,
    /// The reconciler cancelled an abandoned authentication at the gateway, before recording it.
    AfterCancelCall,
    /// The cancellation was recorded (units released, order `cancelled`).
    AfterRecordCancel,
    /// Money is recorded as due back (late success or admin refund), before the refund call.
    BeforeRefundCall,
    /// The gateway refunded, before the refund is recorded.
    AfterRefundCall,
    /// The refund was recorded (checkout and order `refunded`, units back), before the answer.
    AfterRecordRefund,
    /// The relay published a batch to the sink, before marking its rows published: the
    /// broker's duplicate window must keep the republication from counting twice.
    AfterPublish,
    /// A shipment and its capture key are recorded, before the capture call.
    BeforeCaptureCall,
    /// The gateway captured, before the capture is recorded.
    AfterCaptureCall,
    /// The capture was recorded (order partially fulfilled or fulfilled), before the answer.
    AfterRecordCapture,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 15] = [
        FaultPoint::AfterReserve,
        FaultPoint::AfterBeginCharge,
        FaultPoint::AfterGatewayCall,
        FaultPoint::AfterRecordSuccess,
        FaultPoint::AfterRecordDecline,
        FaultPoint::AfterRecordRequiresAction,
        FaultPoint::AfterCancelCall,
        FaultPoint::AfterRecordCancel,
        FaultPoint::BeforeRefundCall,
        FaultPoint::AfterRefundCall,
        FaultPoint::AfterRecordRefund,
        FaultPoint::AfterPublish,
        FaultPoint::BeforeCaptureCall,
        FaultPoint::AfterCaptureCall,
        FaultPoint::AfterRecordCapture,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::AfterReserve => "after_reserve",
            FaultPoint::AfterBeginCharge => "after_begin_charge",
            FaultPoint::AfterGatewayCall => "after_gateway_call",
            FaultPoint::AfterRecordSuccess => "after_record_success",
            FaultPoint::AfterRecordDecline => "after_record_decline",
            FaultPoint::AfterRecordRequiresAction => "after_record_requires_action",
            FaultPoint::AfterCancelCall => "after_cancel_call",
            FaultPoint::AfterRecordCancel => "after_record_cancel",
            FaultPoint::BeforeRefundCall => "before_refund_call",
            FaultPoint::AfterRefundCall => "after_refund_call",
            FaultPoint::AfterRecordRefund => "after_record_refund",
            FaultPoint::AfterPublish => "after_publish",
            FaultPoint::BeforeCaptureCall => "before_capture_call",
            FaultPoint::AfterCaptureCall => "after_capture_call",
            FaultPoint::AfterRecordCapture => "after_record_capture",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_point_parses_back_from_its_name_and_names_are_distinct() {
        for point in FaultPoint::ALL {
            assert_eq!(point.as_str().parse::<FaultPoint>(), Ok(point));
        }
        let mut names: Vec<_> = FaultPoint::ALL.iter().map(|p| p.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FaultPoint::ALL.len());
    }

    #[test]
    fn an_unknown_fault_point_is_refused() {
        assert!("after_everything".parse::<FaultPoint>().is_err());
    }
}
