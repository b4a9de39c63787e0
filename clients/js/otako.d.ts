// Types for otako.js, the Otako Gateway client (docs/PROTOCOL.md).

/** A message object as the reference API stores it (DESIGN §7). */
export interface Message {
  id: string;
  channel_id: string;
  author: { id: string; name: string };
  content: string;
  nonce: string | null;
  timestamp: string;
  edited_timestamp?: string | null;
}

/** The first frame of every connection. */
export interface Hello {
  session_id: string;
  user_id: string;
  heartbeat_interval_ms: number;
  resumed: boolean;
  replayed?: number;
  reason?: "unknown_session" | "too_far_behind";
}

/** An event frame as it arrived: `{"op":0,"t":…,"s":…,"d":…}`. */
export interface Frame<D = unknown> {
  op: number;
  t: string;
  s?: number;
  d: D;
}

export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "stopped";

/** Why the client stopped for good (it will not reconnect by itself). */
export type StopReason =
  | "auth_failed" // 4004: bad or revoked token
  | "session_limit" // 4010: sessions.max_per_user reached
  | "session_replaced" // 4011: a newer session took this one's place
  | "client_sent_data" // 4003
  | "stopped_by_app" // beforeReconnect returned false
  | "closed"; // close() was called

export interface StateChange {
  state: ConnectionState;
  /** Reconnect attempt number (0 on the first connect). */
  attempt?: number;
  /** connecting: whether it tries to resume the last session. */
  resuming?: boolean;
  /** reconnecting: milliseconds until the next attempt. */
  delay?: number;
  /** The close code that ended the last connection. */
  code?: number;
  /** connecting/reconnecting: whether the failed connection had opened. */
  opened?: boolean;
  /** connected: whether the last session was resumed. */
  resumed?: boolean;
  replayed?: number;
  /** stopped: why. */
  reason?: StopReason;
  detail?: string;
}

/** Why the app must refetch its state over HTTP. */
export interface Refetch {
  reason: "unknown_session" | "too_far_behind" | "new_session" | "gap";
}

export interface ClientEvents {
  state: (change: StateChange) => void;
  HELLO: (hello: Hello, frame: Frame<Hello>) => void;
  resumed: (info: { replayed: number }) => void;
  refetch: (info: Refetch) => void;
  gap: (info: { expected: number; got: number }) => void;
  MESSAGE_CREATE: (message: Message, frame: Frame<Message>) => void;
  MESSAGE_UPDATE: (message: Message, frame: Frame<Message>) => void;
  MESSAGE_DELETE: (ids: { id: string; channel_id: string }, frame: Frame) => void;
  /** Every event frame, whatever its `t`. */
  "*": (data: unknown, frame: Frame) => void;
}

export interface ClientOptions {
  token: string;
  /** Send the token as a subprotocol (default: whenever it is a valid one); else `?token=`. */
  subprotocol?: boolean;
  /** First reconnect delay ceiling in ms (default 500); doubles per attempt. */
  minDelay?: number;
  /** Longest reconnect delay ceiling in ms (default 30000). */
  maxDelay?: number;
  /**
   * Called before each reconnect (e.g. to check the token over HTTP after a
   * handshake that never opened); returning false stops the client.
   */
  beforeReconnect?: (info: { code: number; attempt: number; delay: number; opened: boolean }) =>
    | boolean
    | void
    | Promise<boolean | void>;
  /** A WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: unknown;
}

export class OtakoClient {
  constructor(url: string, options: ClientOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly sessionId: string | null;
  readonly userId: string | null;
  /** The last `s` received. */
  readonly seq: number;
  readonly attempt: number;
  on<K extends keyof ClientEvents>(type: K, fn: ClientEvents[K]): () => void;
  on(type: string, fn: (data: any, frame: Frame) => void): () => void;
  connect(): void;
  close(): void;
}
