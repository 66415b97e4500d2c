package config

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// ByteSize is a number of bytes written in YAML as 1048576, "512MiB",
// "10GB" (decimal) or "5GiB" (binary).
type ByteSize int64

var units = []struct {
	suffix string
	mult   float64
}{
	{"KIB", 1 << 10}, {"MIB", 1 << 20}, {"GIB", 1 << 30}, {"TIB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12}, {"B", 1},
}

// ParseByteSize parses a size with an optional unit suffix.
func ParseByteSize(s string) (int64, error) {
	v := strings.ToUpper(strings.TrimSpace(s))
	mult := 1.0
	for _, u := range units {
		if strings.HasSuffix(v, u.suffix) {
			mult, v = u.mult, strings.TrimSpace(strings.TrimSuffix(v, u.suffix))
			break
		}
	}
	n, err := strconv.ParseFloat(v, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a size like 1048576, 512MiB or 10GB", s)
	}
	size := n * mult
	// Converting a float64 beyond int64's range gives no error, only an
	// arbitrary number.
	if size >= math.MaxInt64 {
		return 0, fmt.Errorf("%q is too large a size", s)
	}
	// "1.1KB" is 1100.0000000000002 in binary floating point: a whole
	// number of bytes up to rounding, unlike "0.5".
	whole := math.Round(size)
	if math.Abs(size-whole) > 1e-3 {
		return 0, fmt.Errorf("%q is not a whole number of bytes", s)
	}
	return int64(whole), nil
}

// UnmarshalJSON accepts a number or a string with a unit.
func (b *ByteSize) UnmarshalJSON(data []byte) error {
	var n int64
	if err := json.Unmarshal(data, &n); err == nil {
		*b = ByteSize(n)
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return fmt.Errorf("size must be a number or a string like \"10GB\": %w", err)
	}
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = ByteSize(v)
	return nil
}

// Duration is a time.Duration written in YAML as "30s" or "5m".
type Duration time.Duration

// D returns the value as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalJSON parses a Go duration string.
func (d *Duration) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return fmt.Errorf("duration must be a string like \"30s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration like 30s or 5m", s)
	}
	*d = Duration(v)
	return nil
}

// MarshalJSON writes the Go duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }
