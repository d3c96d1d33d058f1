package hubsim

import (
	"fmt"

	"go.uber.org/zap"

	"github.com/iothubby/iothubby/pkg/clock"
	"github.com/iothubby/iothubby/pkg/hubsim/throttle"
)

// DPS's documented registration rate (performance.md §2.2): 1,000 a minute per DPS instance,
// whatever the hub's tier; with a tier set, hubsim applies it unless DPSRegistrationRate says
// otherwise, with a bucket of one second's worth.
const (
	dpsTierRate  = 1000.0 / 60
	dpsTierBurst = 16
)

// DPSRegistrationOp is the row of DPS registrations in GET /hubsim/throttle.
const DPSRegistrationOp throttle.Op = "dps-registration"

// tierThrottle builds the throttles of Config.Tier (nil when it is empty) and sets DPS's rate.
func (s *Server) tierThrottle() (*throttle.Limiter, error) {
	if s.cfg.Tier == "" {
		if s.cfg.Units != 0 {
			return nil, fmt.Errorf("hubsim: units (%d) need a tier", s.cfg.Units)
		}
		return nil, nil
	}
	if s.cfg.Units == 0 {
		s.cfg.Units = 1
	}
	clk := s.cfg.Clock
	if clk == nil {
		clk = clock.Real()
	}
	lim, err := throttle.NewTier(s.cfg.Tier, s.cfg.Units, clk)
	if err != nil {
		return nil, fmt.Errorf("hubsim: tier: %w", err)
	}
	if s.cfg.DPSRegistrationRate == 0 {
		s.cfg.DPSRegistrationRate, s.cfg.DPSRegistrationBurst = dpsTierRate, dpsTierBurst
	}
	s.throttle = lim
	st := lim.Status()
	s.log.Info("throttling as an IoT Hub tier", zap.String("tier", st.Tier), zap.Int("units", st.Units),
		zap.Float64("connects_per_second", lim.Rate(throttle.Connect)), zap.Float64("d2c_per_second", lim.Rate(throttle.D2C)),
		zap.Float64("dps_registrations_per_second", s.cfg.DPSRegistrationRate))
	return lim, nil
}

// Throttle returns the tier, units and counters of the throttles (GET /hubsim/throttle), DPS
// registrations included.
func (s *Server) Throttle() throttle.Status {
	st := s.throttle.Status()
	st.Operations = append(st.Operations, s.dpsThrottleCounters()...)
	return st
}

// dpsThrottleCounters is DPS's registration row: its own limiter (pkg/hubsim/dps) counts.
func (s *Server) dpsThrottleCounters() []throttle.Counter {
	if s.dps == nil {
		return nil
	}
	st := s.dps.Stats()
	return []throttle.Counter{{
		Op: DPSRegistrationOp, PerSecond: s.cfg.DPSRegistrationRate,
		Allowed: uint64(max(st.RegisterRequests-st.Throttled, 0)), Throttled: uint64(max(st.Throttled, 0)),
	}}
}
