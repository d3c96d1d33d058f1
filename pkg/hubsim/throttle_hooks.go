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

// tierThrottle builds the throttles (off when Config.Tier is empty; POST /hubsim/throttle can
// turn them on later) and, with a tier, sets DPS's rate.
func (s *Server) tierThrottle() (*throttle.Limiter, error) {
	clk := s.cfg.Clock
	if clk == nil {
		clk = clock.Real()
	}
	s.throttle = throttle.Off(clk)
	if s.cfg.Tier == "" {
		if s.cfg.Units != 0 {
			return nil, fmt.Errorf("hubsim: units (%d) need a tier", s.cfg.Units)
		}
		return s.throttle, nil
	}
	if s.cfg.Units == 0 {
		s.cfg.Units = 1
	}
	if err := s.throttle.SetTier(s.cfg.Tier, s.cfg.Units); err != nil {
		return nil, fmt.Errorf("hubsim: tier: %w", err)
	}
	if s.cfg.DPSRegistrationRate == 0 {
		s.cfg.DPSRegistrationRate, s.cfg.DPSRegistrationBurst = dpsTierRate, dpsTierBurst
	}
	s.logTier()
	return s.throttle, nil
}

func (s *Server) logTier() {
	st := s.throttle.Status()
	if st.Tier == "" {
		s.log.Info("tier throttling off")
		return
	}
	s.log.Info("throttling as an IoT Hub tier", zap.String("tier", st.Tier), zap.Int("units", st.Units),
		zap.Float64("connects_per_second", s.throttle.Rate(throttle.Connect)), zap.Float64("d2c_per_second", s.throttle.Rate(throttle.D2C)),
		zap.Float64("dps_registrations_per_second", s.cfg.DPSRegistrationRate))
}

// SetThrottle changes the tier throttles while hubsim runs (POST/DELETE /hubsim/throttle): a
// tier and units, with optional per-operation rates; tier "" turns them off. Buckets start
// full and counters from zero. DPS's rate stays as started.
func (s *Server) SetThrottle(r throttle.Request) error {
	if err := s.throttle.Set(r); err != nil {
		return err
	}
	s.logTier()
	return nil
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
