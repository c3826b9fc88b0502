package config

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"
)

// decodeHook replaces viper's default hooks (durations, comma-separated lists)
// with ones whose errors name the bad value: mapstructure's own duration hook
// drops it ("time: unknown unit"). strictHook refuses what viper's weak typing
// would otherwise take silently from a YAML file.
func decodeHook() viper.DecoderConfigOption {
	return viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(durationHook, strictHook, mapstructure.StringToSliceHookFunc(",")))
}

var durationType = reflect.TypeFor[time.Duration]()

const durationHint = "write a number with a unit, e.g. 10s, 5m or 1h30m"

func durationHook(from, to reflect.Type, data any) (any, error) {
	if from.Kind() != reflect.String || to != durationType {
		return data, nil
	}
	s := data.(string)
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("%q is not a duration: %s", s, durationHint)
	}
	return d, nil
}

// strictHook refuses the conversions a YAML file makes possible that an
// environment variable (always a string, parsed strictly) does not: a bare
// number for a duration, which would be nanoseconds (handshake-timeout: 10
// made every handshake fail), a fraction for a whole number, which would be
// cut, and a number for true or false. Defaults arrive with their own types
// and pass.
func strictHook(from, to reflect.Type, data any) (any, error) {
	if from == to || from == durationType {
		return data, nil
	}
	isNumber := func(k reflect.Kind) bool {
		return k >= reflect.Int && k <= reflect.Uint64 || k == reflect.Float32 || k == reflect.Float64
	}
	switch {
	case to == durationType && isNumber(from.Kind()):
		if reflect.ValueOf(data).IsZero() {
			return time.Duration(0), nil // 0 needs no unit, as in the environment
		}
		return nil, fmt.Errorf("%v is not a duration: %s", data, durationHint)
	case to.Kind() >= reflect.Int && to.Kind() <= reflect.Uint64 && (from.Kind() == reflect.Float32 || from.Kind() == reflect.Float64):
		if f := reflect.ValueOf(data).Float(); f != float64(int64(f)) {
			return nil, fmt.Errorf("%v is not a whole number", data)
		}
	case to.Kind() == reflect.Bool && isNumber(from.Kind()):
		return nil, fmt.Errorf("%v is not true or false", data)
	}
	return data, nil
}

// explainDecodeErr turns mapstructure's report ("decoding failed due to the
// following error(s): 'config.Server' has invalid keys: listne") into one
// sentence per problem, naming the key and, for a bad value, the value.
func explainDecodeErr(err error) error {
	var out []error
	var walk func(error)
	walk = func(err error) {
		if de, ok := err.(*mapstructure.DecodeError); ok {
			var inner *mapstructure.DecodeError
			if errors.As(de.Unwrap(), &inner) {
				walk(de.Unwrap())
				return
			}
			out = append(out, explainField(de))
			return
		}
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
			return
		}
		if inner := errors.Unwrap(err); inner != nil {
			walk(inner)
			return
		}
		out = append(out, err)
	}
	walk(err)
	return errors.Join(out...)
}

func explainField(de *mapstructure.DecodeError) error {
	name := de.Name()
	inner := de.Unwrap()
	if keys, ok := strings.CutPrefix(inner.Error(), "has invalid keys: "); ok {
		where := ""
		if strings.Contains(name, "[") || !strings.HasPrefix(name, "config.") && name != "" {
			where = " in " + name
		}
		return fmt.Errorf("unknown setting%s: %s (check the spelling; tpd init writes a file listing every key)", where, keys)
	}
	var pe *mapstructure.ParseError
	if errors.As(inner, &pe) {
		return fmt.Errorf("%s: %q is not %s", name, fmt.Sprint(pe.Value), kindName(pe.Expected.Kind()))
	}
	var ue *mapstructure.UnconvertibleTypeError
	if errors.As(inner, &ue) {
		return fmt.Errorf("%s: %v is not %s", name, ue.Value, kindName(ue.Expected.Kind()))
	}
	return fmt.Errorf("%s: %w", name, inner)
}

func kindName(k reflect.Kind) string {
	switch k {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Bool:
		return "true or false"
	case reflect.Slice:
		return "a list"
	case reflect.Struct, reflect.Map:
		return "a map of settings"
	default:
		return "a " + k.String()
	}
}
