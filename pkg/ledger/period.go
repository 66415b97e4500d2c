package ledger

import (
	"fmt"
	"time"
)

// Period is a usage period: a UTC month starting on ResetDay.
type Period struct {
	Name       string
	Start, End time.Time
}

// PeriodAt returns the period containing t for a reset day (1–28).
func PeriodAt(t time.Time, resetDay int) Period {
	if resetDay < 1 || resetDay > 28 {
		resetDay = 1
	}
	t = t.UTC()
	start := time.Date(t.Year(), t.Month(), resetDay, 0, 0, 0, 0, time.UTC)
	if t.Before(start) {
		start = start.AddDate(0, -1, 0)
	}
	name := start.Format("2006-01")
	if resetDay != 1 {
		name = start.Format("2006-01-02")
	}
	return Period{Name: name, Start: start, End: start.AddDate(0, 1, 0)}
}

func (p Period) String() string {
	return fmt.Sprintf("%s [%s, %s)", p.Name, p.Start.Format(time.DateOnly), p.End.Format(time.DateOnly))
}
